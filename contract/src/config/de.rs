//! serde over parsed HCL ([`Value`]): a config read from HCL goes through the same derived
//! [`Deserialize`] as YAML, and its errors still say where: the key's path and its line.

use std::fmt;

use serde::Deserialize;
use serde::de::value::BorrowedStrDeserializer;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

use super::hcl::{Pos, Value};

/// Why a parsed file does not fit the keys, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Error {
    /// The key's path, e.g. `jwt_svids[0].jwt_audience` (empty at the top).
    path: String,
    /// The line of the innermost key the error is about.
    line: Option<usize>,
    message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.path.as_str(), self.line) {
            ("", None) => write!(f, "{}", self.message),
            ("", Some(line)) => write!(f, "line {line}: {}", self.message),
            (path, None) => write!(f, "{path}: {}", self.message),
            (path, Some(line)) => write!(f, "{path} at line {line}: {}", self.message),
        }
    }
}

impl de::Error for Error {
    fn custom<T: fmt::Display>(message: T) -> Self {
        Self { path: String::new(), line: None, message: message.to_string() }
    }
}

impl Error {
    /// The error happened at `pos` (unless an inner key said where already).
    fn at(mut self, pos: Pos) -> Self {
        self.line.get_or_insert(pos.line);
        self
    }

    /// The error happened in the value of `step` (a key, or `[index]` of a list).
    fn within(mut self, step: &str) -> Self {
        self.path = match (self.path.is_empty(), self.path.starts_with('[')) {
            (true, _) => step.to_owned(),
            (false, true) => format!("{step}{}", self.path),
            (false, false) => format!("{step}.{}", self.path),
        };
        self
    }
}

/// Reads `T` from a parsed file.
pub fn from_value<'de, T: Deserialize<'de>>(value: &'de Value) -> Result<T, Error> {
    T::deserialize(value)
}

impl<'de> de::Deserializer<'de> for &'de Value {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self {
            Value::Str(s) => visitor.visit_borrowed_str(s),
            Value::Int(i) => visitor.visit_i64(*i),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::List(items) => visitor.visit_seq(Items { items: items.iter().enumerate() }),
            Value::Object(items) => visitor.visit_map(Keys { items: items.iter(), current: None }),
        }
    }

    /// A key that is written has a value: HCL has no null.
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

struct Items<'de> {
    items: std::iter::Enumerate<std::slice::Iter<'de, Value>>,
}

impl<'de> SeqAccess<'de> for Items<'de> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
        let Some((index, value)) = self.items.next() else { return Ok(None) };
        seed.deserialize(value).map(Some).map_err(|e| e.within(&format!("[{index}]")))
    }
}

struct Keys<'de> {
    items: std::slice::Iter<'de, (String, Value, Pos)>,
    current: Option<&'de (String, Value, Pos)>,
}

impl<'de> MapAccess<'de> for Keys<'de> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        let Some(item) = self.items.next() else { return Ok(None) };
        self.current = Some(item);
        let key = BorrowedStrDeserializer::<Error>::new(&item.0);
        seed.deserialize(key).map(Some).map_err(|e| e.at(item.2))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let (key, value, pos) = self.current.take().ok_or_else(|| de::Error::custom("a value without its key"))?;
        seed.deserialize(value).map_err(|e| e.at(*pos).within(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::hcl::parse;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        port: u16,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        name: String,
        blocks: Vec<Inner>,
    }

    fn read(text: &str) -> Result<Outer, String> {
        from_value(&parse(text).map_err(|e| e.to_string())?).map_err(|e| e.to_string())
    }

    #[test]
    fn values_read_as_their_types() {
        let outer = read("name = \"a\"\nblocks { port = 1 }\nblocks { port = 0x10 }").expect("reads");
        assert_eq!(outer, Outer { name: "a".into(), blocks: vec![Inner { port: 1 }, Inner { port: 16 }] });
    }

    #[test]
    fn errors_name_the_key_and_its_line() {
        for (text, expected) in [
            ("name = 1\nblocks = []", "name at line 1: invalid type: integer `1`, expected a string"),
            ("name = \"a\"\nblocks = [{port = 1},\n{port = 70000}]", "blocks[1].port at line 3: invalid value"),
            ("name = \"a\"\n\nblocks = [{port = 1, color = 2}]", "blocks[0] at line 3: unknown field `color`"),
            ("name = \"a\"\nnames = 1", "line 2: unknown field `names`"),
            ("blocks = []", "missing field `name`"),
        ] {
            let error = read(text).expect_err(text);
            assert!(error.starts_with(expected), "{text}: {error}");
        }
    }
}
