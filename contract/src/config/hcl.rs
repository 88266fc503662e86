//! A parser for the HCL v1 that spiffe-helper's `helper.conf` uses: `key = value` pairs, strings,
//! integers read like Go's `strconv.ParseInt(s, 0, 64)` (so `0600` is octal), booleans, lists,
//! objects, `name { ... }` blocks, and `#`, `//` and `/* */` comments.

use std::fmt;

/// A parsed value; objects keep their keys in order with where they were written.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    List(Vec<Value>),
    Object(Vec<(String, Value, Pos)>),
}

/// Line and column (1-based) in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {pos}: {message}")]
pub struct ParseError {
    pub pos: Pos,
    pub message: String,
}

/// Parses a whole file into its top-level object.
pub fn parse(text: &str) -> Result<Value, ParseError> {
    let mut parser = Parser { chars: text.chars().collect(), index: 0, line: 1, column: 1 };
    let items = parser.items(None)?;
    Ok(Value::Object(items))
}

struct Parser {
    chars: Vec<char>,
    index: usize,
    line: usize,
    column: usize,
}

/// What opens a block (named so the error text need not escape it).
const OPEN: char = '{';

impl Parser {
    fn pos(&self) -> Pos {
        Pos { line: self.line, column: self.column }
    }

    fn error<T>(&self, message: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError { pos: self.pos(), message: message.into() })
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.index).copied()
    }

    fn peek_at(&self, offset: usize) -> Option<char> {
        self.chars.get(self.index + offset).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.index += 1;
        if c == '\n' {
            self.line += 1;
            self.column = 1;
        } else {
            self.column += 1;
        }
        Some(c)
    }

    /// Skips blanks, newlines and comments.
    fn skip(&mut self) -> Result<(), ParseError> {
        loop {
            match (self.peek(), self.peek_at(1)) {
                (Some(c), _) if c.is_whitespace() => {
                    self.bump();
                }
                (Some('#'), _) | (Some('/'), Some('/')) => {
                    while self.peek().is_some_and(|c| c != '\n') {
                        self.bump();
                    }
                }
                (Some('/'), Some('*')) => {
                    let start = self.pos();
                    self.bump();
                    self.bump();
                    loop {
                        match (self.peek(), self.peek_at(1)) {
                            (Some('*'), Some('/')) => {
                                self.bump();
                                self.bump();
                                break;
                            }
                            (Some(_), _) => {
                                self.bump();
                            }
                            (None, _) => {
                                return Err(ParseError { pos: start, message: "unterminated /* comment".into() });
                            }
                        }
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    /// Items until `close` (or the end of the file when `None`).
    fn items(&mut self, close: Option<char>) -> Result<Vec<(String, Value, Pos)>, ParseError> {
        let mut items: Vec<(String, Value, Pos)> = Vec::new();
        loop {
            self.skip()?;
            match (self.peek(), close) {
                (None, None) => return Ok(items),
                (None, Some(c)) => return self.error(format!("missing '{c}'")),
                (Some(c), Some(close)) if c == close => {
                    self.bump();
                    return Ok(items);
                }
                _ => {}
            }
            let pos = self.pos();
            let key = self.key()?;
            self.skip()?;
            let value = match self.peek() {
                Some('=') | Some(':') => {
                    self.bump();
                    self.skip()?;
                    self.value()?
                }
                Some('{') => {
                    self.bump();
                    Value::Object(self.items(Some('}'))?)
                }
                _ => return self.error(format!("expected '=' or '{OPEN}' after {key:?}")),
            };
            // A repeated block (`jwt_svids { } jwt_svids { }`) builds a list, as HCL v1 does.
            match items.iter_mut().find(|(k, _, _)| *k == key) {
                Some((_, Value::List(list), _)) if matches!(value, Value::Object(_)) => list.push(value),
                Some((_, existing @ Value::Object(_), _)) if matches!(value, Value::Object(_)) => {
                    let first = std::mem::replace(existing, Value::List(Vec::new()));
                    *existing = Value::List(vec![first, value]);
                }
                Some((_, _, first)) => {
                    return Err(ParseError { pos, message: format!("{key:?} is set twice (first at line {first})") });
                }
                None => items.push((key, value, pos)),
            }
            self.skip()?;
            if self.peek() == Some(',') {
                self.bump();
            }
        }
    }

    fn key(&mut self) -> Result<String, ParseError> {
        match self.peek() {
            Some('"') => self.string(),
            Some(c) if c.is_alphabetic() || c == '_' => {
                let mut key = String::new();
                while let Some(c) = self.peek().filter(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.')) {
                    key.push(c);
                    self.bump();
                }
                Ok(key)
            }
            Some(c) => self.error(format!("unexpected {c:?}, expected a key")),
            None => self.error("unexpected end of file, expected a key"),
        }
    }

    fn value(&mut self) -> Result<Value, ParseError> {
        match self.peek() {
            Some('"') => Ok(Value::Str(self.string()?)),
            Some('[') => {
                self.bump();
                let mut list = Vec::new();
                loop {
                    self.skip()?;
                    match self.peek() {
                        Some(']') => {
                            self.bump();
                            return Ok(Value::List(list));
                        }
                        None => return self.error("missing ']'"),
                        _ => {}
                    }
                    list.push(self.value()?);
                    self.skip()?;
                    match self.peek() {
                        Some(',') => {
                            self.bump();
                        }
                        Some(']') => {}
                        None => return self.error("missing ']'"),
                        _ => return self.error("expected ',' or ']' in a list"),
                    }
                }
            }
            Some('{') => {
                self.bump();
                Ok(Value::Object(self.items(Some('}'))?))
            }
            Some(c) if c.is_ascii_digit() || c == '-' || c == '+' => {
                let pos = self.pos();
                let mut text = String::new();
                while let Some(c) =
                    self.peek().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '+' | '_' | '.'))
                {
                    text.push(c);
                    self.bump();
                }
                parse_int(&text)
                    .map(Value::Int)
                    .ok_or(ParseError { pos, message: format!("{text:?} is not an integer") })
            }
            Some(c) if c.is_alphabetic() => {
                let pos = self.pos();
                let word = self.key()?;
                match word.as_str() {
                    "true" => Ok(Value::Bool(true)),
                    "false" => Ok(Value::Bool(false)),
                    _ => Err(ParseError { pos, message: format!("unexpected {word:?}; strings need quotes") }),
                }
            }
            Some(c) => self.error(format!("unexpected {c:?}, expected a value")),
            None => self.error("unexpected end of file, expected a value"),
        }
    }

    fn string(&mut self) -> Result<String, ParseError> {
        let start = self.pos();
        self.bump();
        let mut text = String::new();
        loop {
            match self.bump() {
                Some('"') => return Ok(text),
                Some('\\') => match self.bump() {
                    Some('n') => text.push('\n'),
                    Some('t') => text.push('\t'),
                    Some('r') => text.push('\r'),
                    Some('"') => text.push('"'),
                    Some('\\') => text.push('\\'),
                    Some('u') => {
                        let hex: String = (0..4).filter_map(|_| self.bump()).collect();
                        match u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                            Some(c) => text.push(c),
                            None => return self.error(format!("bad \\u escape {hex:?}")),
                        }
                    }
                    Some(c) => return self.error(format!("unknown escape \\{c}")),
                    None => break,
                },
                Some('\n') | None => break,
                Some(c) => text.push(c),
            }
        }
        Err(ParseError { pos: start, message: "unterminated string".into() })
    }
}

/// Go's `strconv.ParseInt(text, 0, 64)`: `0x`, `0o`, `0b` prefixes, a leading `0` means octal,
/// underscores only between digits of a prefixed number.
pub fn parse_int(text: &str) -> Option<i64> {
    let (negative, body) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let lower = body.to_ascii_lowercase();
    let (radix, digits, prefixed) = if let Some(rest) = lower.strip_prefix("0x") {
        (16, rest.to_owned(), true)
    } else if let Some(rest) = lower.strip_prefix("0o") {
        (8, rest.to_owned(), true)
    } else if let Some(rest) = lower.strip_prefix("0b") {
        (2, rest.to_owned(), true)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, lower[1..].to_owned(), false)
    } else {
        (10, lower.clone(), false)
    };
    if digits.is_empty() || (!prefixed && digits.contains('_')) || digits.starts_with('_') || digits.ends_with('_') {
        return None;
    }
    let digits = digits.replace('_', "");
    let magnitude = i128::from_str_radix(&digits, radix).ok()?;
    let value = if negative { -magnitude } else { magnitude };
    i64::try_from(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(value: &'a Value, key: &str) -> &'a Value {
        match value {
            Value::Object(items) => &items.iter().find(|(k, _, _)| k == key).expect(key).1,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn integers_follow_go_parse_int_base_zero() {
        assert_eq!(parse_int("0600"), Some(0o600));
        assert_eq!(parse_int("0644"), Some(420));
        assert_eq!(parse_int("420"), Some(420));
        assert_eq!(parse_int("0x1F"), Some(31));
        assert_eq!(parse_int("0o17"), Some(15));
        assert_eq!(parse_int("0b101"), Some(5));
        assert_eq!(parse_int("-8081"), Some(-8081));
        assert_eq!(parse_int("0"), Some(0));
        assert_eq!(parse_int("0x1_0"), Some(16));
        assert_eq!(parse_int("1_000"), None);
        assert_eq!(parse_int("09"), None, "9 is not an octal digit");
        assert_eq!(parse_int("1.5"), None);
    }

    #[test]
    fn parses_every_construct() {
        let text = r#"
            # comment
            agent_address = "/run/spire/agent.sock"   // trailing comment
            /* block
               comment */
            cert_file_mode = 0600
            daemon_mode = false
            jwt_svids = [{jwt_audience="a", jwt_svid_file_name="a.token", jwt_extra_audiences=["x", "y"]},
                         {jwt_audience="b", jwt_svid_file_name="b.token"}]
            health_checks {
                listener_enabled = true
                bind_port = 8081
            }
            "quoted key" = "tab\there \"q\" \u00e9"
        "#;
        let value = parse(text).expect("parses");
        assert_eq!(get(&value, "agent_address"), &Value::Str("/run/spire/agent.sock".into()));
        assert_eq!(get(&value, "cert_file_mode"), &Value::Int(0o600));
        assert_eq!(get(&value, "daemon_mode"), &Value::Bool(false));
        let Value::List(svids) = get(&value, "jwt_svids") else { panic!("list") };
        assert_eq!(svids.len(), 2);
        assert_eq!(
            get(&svids[0], "jwt_extra_audiences"),
            &Value::List(vec![Value::Str("x".into()), Value::Str("y".into())])
        );
        assert_eq!(get(get(&value, "health_checks"), "bind_port"), &Value::Int(8081));
        assert_eq!(get(&value, "quoted key"), &Value::Str("tab\there \"q\" é".into()));
    }

    #[test]
    fn repeated_blocks_become_a_list_and_repeated_scalars_are_errors() {
        let value = parse("jwt_svids { jwt_audience = \"a\" }\njwt_svids { jwt_audience = \"b\" }").expect("parses");
        assert!(matches!(get(&value, "jwt_svids"), Value::List(l) if l.len() == 2));
        let error = parse("cert_dir = \"a\"\ncert_dir = \"b\"").expect_err("duplicate");
        assert_eq!(error.pos.line, 2);
        assert!(error.message.contains("set twice"));
    }

    #[test]
    fn errors_point_at_the_line() {
        for (text, line, expected) in [
            ("a = \"open", 1, "unterminated string"),
            ("a = 1\nb = yes", 2, "strings need quotes"),
            ("a = [1, 2", 1, "missing ']'"),
            ("a {\n b = 1\n", 3, "missing '}'"),
            ("a = 0x", 1, "not an integer"),
            ("= 1", 1, "expected a key"),
        ] {
            let error = parse(text).expect_err(text);
            assert_eq!(error.pos.line, line, "{text}: {error}");
            assert!(error.message.contains(expected), "{text}: {error}");
        }
    }
}
