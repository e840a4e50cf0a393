//! A located YAML tree: the first, untyped parse of a file, so that every unknown key and
//! wrong type can be reported with its position instead of stopping at the first.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Location, Spanned};

/// A 1-based position in the source (columns count characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct Pos {
    pub(crate) line: u64,
    pub(crate) column: u64,
}

impl Pos {
    /// The start of the file.
    pub(crate) const START: Pos = Pos { line: 1, column: 1 };

    fn from_location(loc: Location) -> Self {
        if loc.line() == 0 {
            Pos::START
        } else {
            Pos {
                line: loc.line(),
                column: loc.column().max(1),
            }
        }
    }
}

/// One YAML node and where it is.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub(crate) pos: Pos,
    /// Byte offset and length of the node's text in the source, when known.
    pub(crate) span: Option<(usize, usize)>,
    pub(crate) kind: Kind,
}

/// The shape of a node.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    Null,
    Bool(bool),
    /// A number, as formatted by the parser (the source text is in `Node::span`).
    Number(String),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Kind {
    /// How the kind is named in messages.
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Bool(_) => "a boolean",
            Kind::Number(_) => "a number",
            Kind::Str(_) => "a string",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<Kind>::deserialize(d)?;
        let span = spanned.defined.span();
        let span = match (span.byte_offset(), span.byte_len()) {
            (Some(o), Some(l)) => usize::try_from(o).ok().zip(usize::try_from(l).ok()),
            _ => None,
        };
        Ok(Node {
            pos: Pos::from_location(spanned.referenced),
            span,
            kind: spanned.value,
        })
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(KindVisitor)
    }
}

struct KindVisitor;

impl<'de> Visitor<'de> for KindVisitor {
    type Value = Kind;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any yaml value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Kind, E> {
        Ok(Kind::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Kind, E> {
        Ok(Kind::Number(v.to_string()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Kind, E> {
        Ok(Kind::Number(v.to_string()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Kind, E> {
        Ok(Kind::Number(v.to_string()))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Kind, E> {
        Ok(Kind::Number(v.to_string()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Kind, E> {
        Ok(Kind::Number(v.to_string()))
    }

    fn visit_char<E: de::Error>(self, v: char) -> Result<Kind, E> {
        Ok(Kind::Str(v.to_string()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Kind, E> {
        Ok(Kind::Str(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Kind, E> {
        Ok(Kind::Str(v))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Kind, E> {
        Ok(Kind::Str(String::from_utf8_lossy(v).into_owned()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Kind, E> {
        Ok(Kind::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Kind, E> {
        Ok(Kind::Null)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Kind, D::Error> {
        Kind::deserialize(d)
    }

    fn visit_newtype_struct<D: de::Deserializer<'de>>(self, d: D) -> Result<Kind, D::Error> {
        Kind::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Kind, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Kind::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kind, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Node>()? {
            let value = map.next_value::<Node>()?;
            entries.push((key, value));
        }
        Ok(Kind::Map(entries))
    }
}

/// Why the text could not be turned into a tree.
#[derive(Debug)]
pub(crate) struct YamlError {
    pub(crate) pos: Pos,
    pub(crate) too_complex: bool,
    pub(crate) message: String,
}

/// Parses `text` (one YAML document) into a tree, within fixed budgets. `Ok(None)` for an
/// empty document.
pub(crate) fn parse_tree(text: &str) -> Result<Option<Node>, YamlError> {
    let budget = serde_saphyr::budget! {
        max_depth: MAX_DEPTH,
        flow_nesting_limit: MAX_DEPTH,
        max_nodes: 100_000,
        max_events: 400_000,
        max_aliases: 1_000,
        max_anchors: 1_000,
        max_merge_keys: 1_000,
        max_total_scalar_bytes: 2 * super::MAX_FILE_BYTES,
    };
    let alias_limits = serde_saphyr::alias_limits! {
        max_total_replayed_events: 20_000,
        max_replay_stack_depth: 16,
    };
    let options = serde_saphyr::options! {
        budget: budget,
        alias_limits: alias_limits,
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::LastWins,
        strict_booleans: true,
    };
    serde_saphyr::from_str_with_options::<Option<Node>>(text, options).map_err(yaml_error)
}

/// Deepest nesting of lists and mappings accepted.
pub(crate) const MAX_DEPTH: usize = 32;

fn yaml_error(err: serde_saphyr::Error) -> YamlError {
    use serde_saphyr::MessageFormatter;
    let pos = err.location().map_or(Pos::START, Pos::from_location);
    let mut inner = &err;
    while let serde_saphyr::Error::WithSnippet { error, .. } = inner {
        inner = error;
    }
    if matches!(inner, serde_saphyr::Error::MultipleDocuments { .. }) {
        return YamlError {
            pos,
            too_complex: false,
            message: "the file holds more than one yaml document: remove the `---` separator and keep one document"
                .to_owned(),
        };
    }
    let raw = serde_saphyr::DefaultMessageFormatter.format_message(inner);
    let too_complex = matches!(inner, serde_saphyr::Error::Budget { .. })
        || raw.contains("limit exceeded")
        || raw.contains("budget");
    let mut message: String = raw.escape_debug().collect();
    if let Some(first) = message.get(..1)
        && first.chars().all(|c| c.is_ascii_uppercase())
    {
        let lowered = first.to_ascii_lowercase();
        message.replace_range(..1, &lowered);
    }
    YamlError {
        pos,
        too_complex,
        message,
    }
}
