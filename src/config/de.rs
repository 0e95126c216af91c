//! Deserialises the layered settings tree into [`Settings`](super::Settings), typing each
//! environment override by the field it sets.
//!
//! A variable's value is text. Where the field is a string (a token, an id, a unit, a path, an
//! enum's name) it is taken as it is: `API_TOKEN=123456` is the string `"123456"`. Where the
//! field wants a number, a boolean, a list or a table, the text is read as a TOML value (`50`,
//! `true`, `1.5`, `["a", "b"]`), or as a `u64` beyond TOML's signed range. The type is asked by
//! the field's own `Deserialize`, so no list of string keys can fall out of date; values from
//! the defaults and the file keep their TOML types.

use std::collections::BTreeMap;

use serde::de::{
    DeserializeSeed, Deserializer, Error as _, IntoDeserializer, MapAccess, SeqAccess, Visitor,
};
use toml::Value;
use toml::de::Error;

/// Which nodes of the tree hold a variable's text, by path (array indices as decimal keys).
#[derive(Debug, Default)]
pub(super) struct EnvMarks {
    /// This node is a variable's text, still untyped.
    pub(super) text: bool,
    /// Marks below this node.
    pub(super) children: BTreeMap<String, EnvMarks>,
}

/// A node of the tree with the marks below it.
pub(super) struct Layered<'a> {
    value: Value,
    marks: Option<&'a EnvMarks>,
}

impl<'a> Layered<'a> {
    /// The root of a tree with its marks.
    pub(super) fn new(value: Value, marks: &'a EnvMarks) -> Self {
        Self {
            value,
            marks: Some(marks),
        }
    }

    /// The variable's text, when this node is one.
    fn into_text(self) -> Result<String, Self> {
        match self.value {
            Value::String(text) if self.marks.is_some_and(|m| m.text) => Ok(text),
            value => Err(Self { value, ..self }),
        }
    }
}

/// A variable's text where the field wants a typed value.
fn typed_text<'de, V: Visitor<'de>>(text: String, visitor: V) -> Result<V::Value, Error> {
    if let Ok(n) = text.parse::<u64>() {
        // TOML integers stop at i64::MAX; a u64 field (a seed) takes the rest.
        return visitor.visit_u64(n);
    }
    // `v = <text>` reads scalars, arrays and inline tables exactly as a file would.
    let parsed = format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .filter(|table| table.len() == 1)
        .and_then(|mut table| table.remove("v"));
    match parsed {
        Some(value) => value.deserialize_any(visitor),
        // Not a TOML value: the field's own error says what it expected.
        None => Value::String(text).deserialize_any(visitor),
    }
}

/// The methods whose field wants a typed value: a variable's text is parsed first.
macro_rules! typed {
    ($($method:ident $(($($arg:ident: $ty:ty),*))?;)*) => {$(
        fn $method<V: Visitor<'de>>(self, $($($arg: $ty,)*)? visitor: V) -> Result<V::Value, Error> {
            match self.into_text() {
                Ok(text) => typed_text(text, visitor),
                Err(node) => node.deserialize_any(visitor),
            }
        }
    )*};
}

/// The methods whose field wants text: a variable's text is taken as it is.
macro_rules! textual {
    ($($method:ident;)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self.into_text() {
                Ok(text) => visitor.visit_string(text),
                Err(node) => node.deserialize_any(visitor),
            }
        }
    )*};
}

impl<'de> Deserializer<'de> for Layered<'_> {
    type Error = Error;

    /// Tables and arrays are walked here, so the marks below them are kept; scalars go to
    /// `toml`'s own deserializer, as they would without this layer.
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let marks = self.marks;
        match self.value {
            Value::String(text) if marks.is_some_and(|m| m.text) => visitor.visit_string(text),
            Value::Table(table) => visitor.visit_map(TableAccess {
                entries: table.into_iter(),
                marks,
                value: None,
            }),
            Value::Array(items) => visitor.visit_seq(ArrayAccess {
                items: items.into_iter().enumerate(),
                marks,
            }),
            scalar => scalar.deserialize_any(visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        // A present key is `Some`; a missing one never gets here.
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        // Enum names are text in a file too; `toml` handles both.
        self.value.deserialize_enum(name, variants, visitor)
    }

    typed! {
        deserialize_bool; deserialize_i8; deserialize_i16; deserialize_i32; deserialize_i64;
        deserialize_i128; deserialize_u8; deserialize_u16; deserialize_u32; deserialize_u64;
        deserialize_u128; deserialize_f32; deserialize_f64; deserialize_unit; deserialize_seq;
        deserialize_map;
        deserialize_unit_struct(_name: &'static str);
        deserialize_tuple(_len: usize);
        deserialize_tuple_struct(_name: &'static str, _len: usize);
        deserialize_struct(_name: &'static str, _fields: &'static [&'static str]);
    }

    textual! {
        deserialize_char; deserialize_str; deserialize_string; deserialize_bytes;
        deserialize_byte_buf; deserialize_identifier; deserialize_ignored_any;
    }
}

struct TableAccess<'a> {
    entries: toml::map::IntoIter<String, Value>,
    marks: Option<&'a EnvMarks>,
    value: Option<Layered<'a>>,
}

impl<'de> MapAccess<'de> for TableAccess<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        let marks = self.marks.and_then(|m| m.children.get(&key));
        self.value = Some(Layered { value, marks });
        seed.deserialize(key.into_deserializer()).map(Some)
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, Error> {
        let value = self
            .value
            .take()
            .ok_or_else(|| Error::custom("a value was asked for before its key"))?;
        seed.deserialize(value)
    }
}

struct ArrayAccess<'a> {
    items: std::iter::Enumerate<std::vec::IntoIter<Value>>,
    marks: Option<&'a EnvMarks>,
}

impl<'de> SeqAccess<'de> for ArrayAccess<'_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        let Some((index, value)) = self.items.next() else {
            return Ok(None);
        };
        let marks = self.marks.and_then(|m| m.children.get(&index.to_string()));
        seed.deserialize(Layered { value, marks }).map(Some)
    }
}
