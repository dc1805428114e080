//! Sizes as the configuration and the command line write them (`500MiB`, `20GiB`, `2TiB`).

/// Parses a size as written in the config and on the command line (`500MiB`, `20GiB`, `2TiB`,
/// `1.5GB`, or a plain number of bytes), with an error that shows the accepted forms.
pub fn parse_size(s: &str) -> Result<bytesize::ByteSize, String> {
    let trimmed = s.trim();
    // bytesize takes "-5GiB" apart as a unit error deep inside; refuse signs here.
    let parsed = if trimmed.starts_with(['-', '+']) {
        None
    } else {
        trimmed.parse::<bytesize::ByteSize>().ok()
    };
    parsed.ok_or_else(|| size_error(s))
}

fn size_error(s: &str) -> String {
    format!("invalid size {s:?}: expected a number with an optional unit, e.g. 500MiB, 20GiB, 2TiB")
}

/// Writes a size in the largest binary unit that divides it exactly (`50GiB`), so that it
/// reads back as the same number of bytes.
pub fn format_size(size: bytesize::ByteSize) -> String {
    let bytes = size.as_u64();
    for (unit, factor) in [
        ("PiB", 1u64 << 50),
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if bytes != 0 && bytes % factor == 0 {
            return format!("{}{unit}", bytes / factor);
        }
    }
    format!("{bytes}B")
}

/// Serde for `Option<ByteSize>` fields: a string through [`parse_size`] or a number of bytes.
pub mod optional {
    use std::fmt;

    use serde::de::{self, Deserializer, Visitor};
    use serde::Serializer;

    struct SizeVisitor;

    impl<'de> Visitor<'de> for SizeVisitor {
        type Value = Option<bytesize::ByteSize>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size such as \"500MiB\", \"20GiB\" or \"2TiB\", or a number of bytes")
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            super::parse_size(s).map(Some).map_err(E::custom)
        }

        fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
            Ok(Some(bytesize::ByteSize(n)))
        }

        fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
            u64::try_from(n)
                .map(|n| Some(bytesize::ByteSize(n)))
                .map_err(|_| E::custom(super::size_error(&n.to_string())))
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(SizeVisitor)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<bytesize::ByteSize>, D::Error> {
        d.deserialize_option(SizeVisitor)
    }

    pub fn serialize<S: Serializer>(
        size: &Option<bytesize::ByteSize>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match size {
            Some(size) => s.serialize_str(&super::format_size(*size)),
            None => s.serialize_none(),
        }
    }
}

/// Serde for `ByteSize` fields that always have a value: as [`optional`], a size is required.
pub mod required {
    use serde::de::{Deserializer, Error};
    use serde::Serializer;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bytesize::ByteSize, D::Error> {
        super::optional::deserialize(d)?.ok_or_else(|| D::Error::custom("a size is required"))
    }

    pub fn serialize<S: Serializer>(size: &bytesize::ByteSize, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_size(*size))
    }
}
