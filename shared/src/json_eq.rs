//! Whether a value serializes to a given JSON [`Value`], without building that value.
//!
//! `serialized_as(x, v)` answers `serde_json::to_value(x)? == *v` by walking `x`'s
//! serialization against `v`: no allocation, and it stops at the first difference. The write
//! side uses it to keep a client's `data` as it came when it already is its payload's
//! normalized form, instead of building that form again and dropping the one it has.
//!
//! It answers "no" for what it does not follow (byte strings, 128-bit and 32-bit float
//! numbers, enum variants that carry data, map keys that are not strings). A "no" only costs
//! the caller the normal path, so every doubt is a "no".
//!
//! The check counts the keys emitted against the object's, so each must be emitted once. A
//! struct's fields are distinct; a map's keys must come in increasing order, as a `BTreeMap`'s
//! and a `serde_json::Map`'s do, or the answer is "no" (a `HashMap`, a struct with a
//! flattened map: either could emit a key twice and leave another unchecked).

use std::fmt;

use serde::ser::{self, Impossible, Serialize};
use serde_json::{Map, Number, Value};

/// `serde_json::to_value(x) == Ok(v.clone())`, without building the value.
pub fn serialized_as<T: Serialize + ?Sized>(x: &T, v: &Value) -> bool {
    x.serialize(Expect(v)).is_ok()
}

/// A difference: the only error the walk reports.
#[derive(Debug)]
pub struct Differs;

impl fmt::Display for Differs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the value serializes differently")
    }
}

impl std::error::Error for Differs {}

impl ser::Error for Differs {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Differs
    }
}

fn check(same: bool) -> Result<(), Differs> {
    if same {
        Ok(())
    } else {
        Err(Differs)
    }
}

/// A serializer that succeeds only where serde_json's `to_value` would build `self.0`.
struct Expect<'a>(&'a Value);

impl Expect<'_> {
    fn number(self, n: Number) -> Result<(), Differs> {
        check(matches!(self.0, Value::Number(m) if *m == n))
    }
}

impl<'a> ser::Serializer for Expect<'a> {
    type Ok = ();
    type Error = Differs;
    type SerializeSeq = Elements<'a>;
    type SerializeTuple = Elements<'a>;
    type SerializeTupleStruct = Elements<'a>;
    type SerializeTupleVariant = Impossible<(), Differs>;
    type SerializeMap = Entries<'a>;
    type SerializeStruct = Entries<'a>;
    type SerializeStructVariant = Impossible<(), Differs>;

    fn serialize_bool(self, b: bool) -> Result<(), Differs> {
        check(self.0.as_bool() == Some(b))
    }
    fn serialize_i8(self, i: i8) -> Result<(), Differs> {
        self.serialize_i64(i.into())
    }
    fn serialize_i16(self, i: i16) -> Result<(), Differs> {
        self.serialize_i64(i.into())
    }
    fn serialize_i32(self, i: i32) -> Result<(), Differs> {
        self.serialize_i64(i.into())
    }
    fn serialize_i64(self, i: i64) -> Result<(), Differs> {
        self.number(i.into())
    }
    fn serialize_u8(self, u: u8) -> Result<(), Differs> {
        self.serialize_u64(u.into())
    }
    fn serialize_u16(self, u: u16) -> Result<(), Differs> {
        self.serialize_u64(u.into())
    }
    fn serialize_u32(self, u: u32) -> Result<(), Differs> {
        self.serialize_u64(u.into())
    }
    fn serialize_u64(self, u: u64) -> Result<(), Differs> {
        self.number(u.into())
    }
    fn serialize_f32(self, _: f32) -> Result<(), Differs> {
        Err(Differs)
    }
    fn serialize_f64(self, f: f64) -> Result<(), Differs> {
        // As `Value::from(f64)`: a number, or null when it is not finite.
        match Number::from_f64(f) {
            Some(n) => self.number(n),
            None => check(self.0.is_null()),
        }
    }
    fn serialize_char(self, c: char) -> Result<(), Differs> {
        self.serialize_str(c.encode_utf8(&mut [0; 4]))
    }
    fn serialize_str(self, s: &str) -> Result<(), Differs> {
        check(self.0.as_str() == Some(s))
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<(), Differs> {
        Err(Differs)
    }
    fn serialize_none(self) -> Result<(), Differs> {
        check(self.0.is_null())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, x: &T) -> Result<(), Differs> {
        x.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Differs> {
        check(self.0.is_null())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), Differs> {
        self.serialize_unit()
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<(), Differs> {
        self.serialize_str(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        x: &T,
    ) -> Result<(), Differs> {
        x.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), Differs> {
        Err(Differs)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Elements<'a>, Differs> {
        match self.0 {
            Value::Array(items) => Ok(Elements { items, next: 0 }),
            _ => Err(Differs),
        }
    }
    fn serialize_tuple(self, len: usize) -> Result<Elements<'a>, Differs> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _: &'static str, len: usize) -> Result<Elements<'a>, Differs> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, Differs> {
        Err(Differs)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Entries<'a>, Differs> {
        match self.0 {
            Value::Object(object) => Ok(Entries {
                object,
                emitted: 0,
                value: None,
                last: None,
            }),
            _ => Err(Differs),
        }
    }
    fn serialize_struct(self, _: &'static str, len: usize) -> Result<Entries<'a>, Differs> {
        self.serialize_map(Some(len))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, Differs> {
        Err(Differs)
    }
}

/// The elements of an array, matched in order.
struct Elements<'a> {
    items: &'a [Value],
    next: usize,
}

impl Elements<'_> {
    fn element<T: Serialize + ?Sized>(&mut self, x: &T) -> Result<(), Differs> {
        let item = self.items.get(self.next).ok_or(Differs)?;
        self.next += 1;
        x.serialize(Expect(item))
    }
    fn done(self) -> Result<(), Differs> {
        check(self.next == self.items.len())
    }
}

/// serde's three kinds of sequence, each an array to to_value.
macro_rules! elements {
    ($($kind:ident :: $add:ident),*) => {$(
        impl ser::$kind for Elements<'_> {
            type Ok = ();
            type Error = Differs;
            fn $add<T: Serialize + ?Sized>(&mut self, x: &T) -> Result<(), Differs> {
                self.element(x)
            }
            fn end(self) -> Result<(), Differs> {
                self.done()
            }
        }
    )*};
}

elements!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field
);

/// The entries of an object, each emitted key looked up in it; at the end, as many keys must
/// have been emitted as it holds.
struct Entries<'a> {
    object: &'a Map<String, Value>,
    emitted: usize,
    /// The value of the key just emitted by `serialize_key`.
    value: Option<&'a Value>,
    /// The last key a map emitted: the next must be greater.
    last: Option<&'a str>,
}

impl<'a> Entries<'a> {
    fn entry<T: Serialize + ?Sized>(&mut self, key: &str, x: &T) -> Result<(), Differs> {
        let v = self.object.get(key).ok_or(Differs)?;
        self.emitted += 1;
        x.serialize(Expect(v))
    }
    fn done(self) -> Result<(), Differs> {
        check(self.emitted == self.object.len())
    }
}

impl ser::SerializeMap for Entries<'_> {
    type Ok = ();
    type Error = Differs;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Differs> {
        let (key, value) = key.serialize(Lookup(self.object))?;
        if self.last.is_some_and(|last| last >= key) {
            return Err(Differs);
        }
        self.last = Some(key);
        self.value = Some(value);
        self.emitted += 1;
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, x: &T) -> Result<(), Differs> {
        x.serialize(Expect(self.value.take().ok_or(Differs)?))
    }
    fn end(self) -> Result<(), Differs> {
        self.done()
    }
}

impl ser::SerializeStruct for Entries<'_> {
    type Ok = ();
    type Error = Differs;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        x: &T,
    ) -> Result<(), Differs> {
        self.entry(key, x)
    }
    fn end(self) -> Result<(), Differs> {
        self.done()
    }
}

/// Serializer methods of one value that answer "differs" whatever the value.
macro_rules! refuse {
    ($($method:ident($t:ty)),*) => {$(
        fn $method(self, _: $t) -> Result<Self::Ok, Differs> {
            Err(Differs)
        }
    )*};
}

/// A map key, looked up in the object: only string keys are followed. Gives the object's
/// key and its value.
struct Lookup<'a>(&'a Map<String, Value>);

impl<'a> ser::Serializer for Lookup<'a> {
    type Ok = (&'a str, &'a Value);
    type Error = Differs;
    type SerializeSeq = Impossible<Self::Ok, Differs>;
    type SerializeTuple = Impossible<Self::Ok, Differs>;
    type SerializeTupleStruct = Impossible<Self::Ok, Differs>;
    type SerializeTupleVariant = Impossible<Self::Ok, Differs>;
    type SerializeMap = Impossible<Self::Ok, Differs>;
    type SerializeStruct = Impossible<Self::Ok, Differs>;
    type SerializeStructVariant = Impossible<Self::Ok, Differs>;

    fn serialize_str(self, s: &str) -> Result<Self::Ok, Differs> {
        let (key, value) = self.0.get_key_value(s).ok_or(Differs)?;
        Ok((key, value))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        x: &T,
    ) -> Result<Self::Ok, Differs> {
        x.serialize(self)
    }
    refuse!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_bytes(&[u8])
    );
    fn serialize_none(self) -> Result<Self::Ok, Differs> {
        Err(Differs)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<Self::Ok, Differs> {
        Err(Differs)
    }
    fn serialize_unit(self) -> Result<Self::Ok, Differs> {
        Err(Differs)
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<Self::Ok, Differs> {
        Err(Differs)
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
    ) -> Result<Self::Ok, Differs> {
        Err(Differs)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<Self::Ok, Differs> {
        Err(Differs)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Differs> {
        Err(Differs)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, Differs> {
        Err(Differs)
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, Differs> {
        Err(Differs)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, Differs> {
        Err(Differs)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Differs> {
        Err(Differs)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct, Differs> {
        Err(Differs)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, Differs> {
        Err(Differs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;
    use serde_json::json;
    use std::collections::BTreeMap;

    /// The answer is `to_value(x) == v`, for values that are and are not `x`'s form.
    fn agrees<T: Serialize>(x: &T, candidates: &[Value]) {
        let form = serde_json::to_value(x).unwrap();
        assert!(serialized_as(x, &form), "{form}");
        for v in candidates {
            assert_eq!(serialized_as(x, v), form == *v, "{form} against {v}");
        }
    }

    #[derive(Serialize)]
    struct Inner {
        n: i64,
        #[serde(skip_serializing_if = "Option::is_none")]
        o: Option<String>,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "snake_case")]
    enum Kind {
        Gauge,
        UpDown,
    }

    #[derive(Serialize)]
    struct Outer {
        s: String,
        f: f64,
        u: u32,
        b: bool,
        kind: Kind,
        list: Vec<Inner>,
        map: BTreeMap<String, String>,
        nothing: Option<i64>,
        any: Value,
    }

    #[test]
    fn it_answers_as_to_value_would() {
        let x = Outer {
            s: "é\"\u{0}".into(),
            f: 1.5,
            u: 7,
            b: true,
            kind: Kind::UpDown,
            list: vec![
                Inner { n: -3, o: None },
                Inner {
                    n: 4,
                    o: Some("x".into()),
                },
            ],
            map: [("a".into(), "1".into()), ("b".into(), "2".into())].into(),
            nothing: None,
            any: json!({"k": [1, 2.5, null, {"z": false}]}),
        };
        let form = serde_json::to_value(&x).unwrap();
        let with = |path: &str, v: Value| {
            let mut f = form.clone();
            *f.pointer_mut(path).unwrap() = v;
            f
        };
        let without = |key: &str| {
            let mut f = form.clone();
            f.as_object_mut().unwrap().remove(key);
            f
        };
        let mut extra = form.clone();
        extra["more"] = json!(1);
        let mut inner_extra = form.clone();
        inner_extra["list"][0]["o"] = Value::Null;
        agrees(
            &x,
            &[
                with("/s", json!("é\"")),
                with("/f", json!(1.25)),
                // The same number, as an integer: to_value writes 2.0, not 2.
                with("/u", json!(7.0)),
                with("/u", json!(-7)),
                with("/b", json!(false)),
                with("/kind", json!("gauge")),
                with("/kind", json!("UpDown")),
                with("/list", json!([])),
                with("/list/1/o", json!("y")),
                with("/map/b", json!(2)),
                with("/nothing", json!(0)),
                with("/any/k/3/z", json!(true)),
                with("/any/k/1", json!(2)),
                without("nothing"),
                without("map"),
                extra,
                inner_extra,
                json!([]),
                Value::Null,
            ],
        );
        // Floats: an integer-valued one is written 2.0; one that is not finite is null.
        agrees(&2.0f64, &[json!(2), json!(2.0), Value::Null]);
        agrees(&f64::NAN, &[json!(0.0), Value::Null]);
        agrees(&-0.0f64, &[json!(0.0), json!(-0.0)]);
        agrees(
            &u64::MAX,
            &[json!(u64::MAX), json!(-1), json!(u64::MAX as f64)],
        );
        agrees(
            &vec![1u8, 2],
            &[json!([1, 2, 3]), json!([1]), json!([2, 1])],
        );
        agrees(&Some('c'), &[json!("c"), json!("d"), Value::Null]);
        agrees(&(), &[Value::Null, json!({})]);
        agrees(
            &Kind::Gauge,
            &[json!("gauge"), json!("up_down"), json!("Gauge")],
        );
    }

    /// A key emitted twice could hide one never checked: maps must emit theirs in order.
    #[test]
    fn keys_out_of_order_or_twice_are_a_difference() {
        #[derive(Serialize)]
        struct Flat {
            a: i32,
            #[serde(flatten)]
            m: BTreeMap<String, i32>,
        }
        let twice = Flat {
            a: 1,
            m: [("a".into(), 1)].into(),
        };
        assert_eq!(serde_json::to_value(&twice).unwrap(), json!({"a": 1}));
        assert!(!serialized_as(&twice, &json!({"a": 1, "b": 0})));
        // Out of order, though each once: answered "no", though to_value would agree.
        let backwards: Vec<(&str, i32)> = vec![("b", 2), ("a", 1)];
        struct Pairs<'a>(&'a [(&'a str, i32)]);
        impl Serialize for Pairs<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
            }
        }
        assert!(!serialized_as(&Pairs(&backwards), &json!({"a": 1, "b": 2})));
        assert!(serialized_as(
            &Pairs(&[("a", 1), ("b", 2)]),
            &json!({"a": 1, "b": 2})
        ));
    }

    #[test]
    fn what_it_does_not_follow_is_a_difference() {
        // Keys that are not strings are written as strings by to_value; not followed here.
        let keyed: BTreeMap<i32, i32> = [(1, 2)].into();
        assert!(!serialized_as(&keyed, &json!({"1": 2})));
        assert!(!serialized_as(&1.5f32, &json!(1.5)));
    }
}
