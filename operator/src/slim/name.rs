//! SLIM names: `org/ns/app[/instance]`, parsed, validated and encoded the way the SLIM data plane
//! hashes them. Pure code, no IO.

use std::fmt;

use super::pb::dataplane::v1 as dp;

/// The instance id SLIM uses for "no instance" (`NULL_COMPONENT`).
pub const NO_INSTANCE: u128 = u128::MAX;

/// A SLIM name: three non-empty components and an optional 128-bit instance id (a UUID).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlimName {
    components: [String; 3],
    instance: Option<u128>,
}

/// Why a string is not a SLIM name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{input:?} has {found} components; a SLIM name is org/namespace/name with an optional 4th instance UUID")]
    ComponentCount { input: String, found: usize },
    #[error("{input:?}: component {index} is empty")]
    EmptyComponent { input: String, index: usize },
    #[error("{input:?}: component {index} contains whitespace")]
    Whitespace { input: String, index: usize },
    #[error("{input:?}: instance {instance:?} is not a UUID")]
    BadInstance { input: String, instance: String },
}

impl SlimName {
    /// Parses `org/ns/app` or `org/ns/app/<uuid>`.
    pub fn parse(input: &str) -> Result<Self, NameError> {
        let parts: Vec<&str> = input.split('/').collect();
        if !(3..=4).contains(&parts.len()) {
            return Err(NameError::ComponentCount { input: input.to_owned(), found: parts.len() });
        }
        for (index, part) in parts.iter().enumerate() {
            if part.is_empty() {
                return Err(NameError::EmptyComponent { input: input.to_owned(), index });
            }
            if part.chars().any(char::is_whitespace) {
                return Err(NameError::Whitespace { input: input.to_owned(), index });
            }
        }
        let instance = match parts.get(3) {
            None => None,
            Some(raw) => {
                let uuid = uuid::Uuid::try_parse(raw)
                    .map_err(|_| NameError::BadInstance { input: input.to_owned(), instance: (*raw).to_owned() })?;
                Some(uuid.as_u128())
            }
        };
        Ok(Self { components: [parts[0].to_owned(), parts[1].to_owned(), parts[2].to_owned()], instance })
    }

    /// The same name without its instance (`org/ns/app`).
    pub fn without_instance(&self) -> Self {
        Self { components: self.components.clone(), instance: None }
    }

    /// The same name with `instance` (`org/ns/app/<uuid>`).
    pub fn with_instance(&self, instance: u128) -> Self {
        Self { components: self.components.clone(), instance: Some(instance) }
    }

    pub fn components(&self) -> &[String; 3] {
        &self.components
    }

    pub fn instance(&self) -> Option<u128> {
        self.instance
    }

    /// The hashed identity the node uses to match routes.
    pub fn key(&self) -> NameKey {
        NameKey {
            components: [
                component_hash(&self.components[0]),
                component_hash(&self.components[1]),
                component_hash(&self.components[2]),
            ],
            instance: self.instance.unwrap_or(NO_INSTANCE),
        }
    }

    /// The wire form: encoded hashes (required by the node) plus the strings (for display).
    pub fn to_proto(&self) -> dp::Name {
        let key = self.key();
        dp::Name {
            name: Some(key.to_proto()),
            str_name: Some(dp::StringName {
                str_component_0: self.components[0].clone(),
                str_component_1: self.components[1].clone(),
                str_component_2: self.components[2].clone(),
            }),
        }
    }
}

impl fmt::Display for SlimName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c] = &self.components;
        write!(f, "{a}/{b}/{c}")?;
        if let Some(id) = self.instance {
            write!(f, "/{}", uuid::Uuid::from_u128(id))?;
        }
        Ok(())
    }
}

/// The hashed form of a name, as nodes report it in their route lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NameKey {
    pub components: [u64; 3],
    pub instance: u128,
}

impl NameKey {
    pub fn to_proto(self) -> dp::EncodedName {
        dp::EncodedName {
            component_0: self.components[0],
            component_1: self.components[1],
            component_2: self.components[2],
            name_id: Some(dp::NameId { id_0: (self.instance >> 64) as u64, id_1: self.instance as u64 }),
        }
    }

    /// Reads a name from a node's reply. Names with no encoded part are not routes we manage.
    pub fn from_proto(name: &dp::Name) -> Option<Self> {
        let encoded = name.name.as_ref()?;
        let instance =
            encoded.name_id.as_ref().map_or(NO_INSTANCE, |id| (u128::from(id.id_0) << 64) | u128::from(id.id_1));
        Some(Self { components: [encoded.component_0, encoded.component_1, encoded.component_2], instance })
    }
}

/// `xxh64(utf8 ++ [0xFF], seed 0)`: what Rust's `Hash for str` feeds SLIM's `XxHash64` hasher.
pub fn component_hash(component: &str) -> u64 {
    let mut hasher = xxhash_rust::xxh64::Xxh64::new(0);
    hasher.update(component.as_bytes());
    hasher.update(&[0xFF]);
    hasher.digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_matches_the_data_plane_check_value() {
        assert_eq!(component_hash("bob"), 5309210987355009988);
    }

    #[test]
    fn parses_three_components() {
        let name = SlimName::parse("org/ns/app").expect("valid");
        assert_eq!(name.components(), &["org".to_owned(), "ns".to_owned(), "app".to_owned()]);
        assert_eq!(name.instance(), None);
        assert_eq!(name.key().instance, NO_INSTANCE);
        assert_eq!(name.to_string(), "org/ns/app");
    }

    #[test]
    fn parses_instance_uuid_high_bits_first() {
        let name = SlimName::parse("org/ns/app/00000000-0000-0001-0000-000000000002").expect("valid");
        let encoded = name.key().to_proto();
        let id = encoded.name_id.expect("id");
        assert_eq!((id.id_0, id.id_1), (1, 2));
        assert_eq!(name.to_string(), "org/ns/app/00000000-0000-0001-0000-000000000002");
        assert_eq!(NameKey::from_proto(&name.to_proto()), Some(name.key()));
    }

    #[test]
    fn rejects_bad_names_with_a_reason() {
        for (input, expected) in [
            ("org/ns", "2 components"),
            ("a/b/c/d/e", "5 components"),
            ("org//app", "component 1 is empty"),
            ("org/n s/app", "whitespace"),
            ("org/ns/app/not-a-uuid", "not a UUID"),
        ] {
            let err = SlimName::parse(input).expect_err(input).to_string();
            assert!(err.contains(expected), "{input}: {err}");
        }
    }

    #[test]
    fn proto_carries_hashes_and_strings() {
        let proto = SlimName::parse("agntcy/ns/bob").expect("valid").to_proto();
        let encoded = proto.name.expect("encoded");
        assert_eq!(encoded.component_2, 5309210987355009988);
        assert_eq!(proto.str_name.expect("strings").str_component_2, "bob");
    }

    /// SLIM names from anywhere (specs, node listings, status): parsing never panics, and a
    /// parsed name printed parses back to itself.
    mod properties {
        use proptest::prelude::*;

        use super::*;

        fn component() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-zA-Z0-9._-]{1,12}",
                "[^/]{1,8}".prop_filter("no whitespace", |c| !c.chars().any(char::is_whitespace))
            ]
        }

        proptest! {
            #[test]
            fn any_string_is_parsed_or_refused_without_a_panic(input in "\\PC{0,40}|([a-z/]{0,4}/){2,5}.{0,8}") {
                let _ = SlimName::parse(&input);
            }

            #[test]
            fn a_name_printed_parses_back_to_itself(
                parts in [component(), component(), component()],
                instance in prop::option::of(any::<u128>()),
            ) {
                let text = parts.join("/");
                let text = match instance {
                    Some(id) => format!("{text}/{}", uuid::Uuid::from_u128(id)),
                    None => text,
                };
                let name = SlimName::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(name.to_string(), text.clone(), "printed as written");
                prop_assert_eq!(SlimName::parse(&name.to_string()), Ok(name.clone()));
                prop_assert_eq!(name.instance(), instance);
                prop_assert_eq!(name.without_instance().with_instance(instance.unwrap_or(NO_INSTANCE)).key(), name.key());
            }
        }
    }
}
