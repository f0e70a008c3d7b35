//! The tiers file as text: JSON syntax, duplicate keys and trailing data, each reported with
//! the JSON path where it was found, before any field is interpreted.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::Problem;

/// One step of a JSON path.
#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Index(usize),
}

/// The path being read, and the first problem found with where it was found.
#[derive(Default)]
struct Reader {
    path: RefCell<Vec<Step>>,
    problem: RefCell<Option<Problem>>,
}

impl Reader {
    fn path(&self) -> String {
        let mut out = String::new();
        for step in self.path.borrow().iter() {
            match step {
                Step::Key(k) if out.is_empty() => out.push_str(k),
                Step::Key(k) => {
                    out.push('.');
                    out.push_str(k);
                }
                Step::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    }

    /// Records `message` at the current path, unless a deeper problem was recorded first.
    fn note(&self, message: impl FnOnce() -> String) {
        let mut problem = self.problem.borrow_mut();
        if problem.is_none() {
            *problem = Some(Problem {
                path: self.path(),
                message: message(),
            });
        }
    }

    /// Runs `f` with `step` appended to the path; a failure inside is noted at that path.
    fn at<T, E: fmt::Display>(&self, step: Step, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        self.path.borrow_mut().push(step);
        let r = f();
        if let Err(e) = &r {
            self.note(|| e.to_string());
        }
        self.path.borrow_mut().pop();
        r
    }
}

/// Reads one JSON value, checking that no object lists a key twice.
#[derive(Clone, Copy)]
struct Node<'a>(&'a Reader);

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON numbers are finite: `from_f64` refuses only NaN and infinities.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        loop {
            let i = out.len();
            match self.0.at(Step::Index(i), || seq.next_element_seed(self))? {
                Some(v) => out.push(v),
                None => return Ok(Value::Array(out)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        let mut seen = HashSet::new();
        loop {
            let key = match map.next_key::<String>() {
                Ok(Some(k)) => k,
                Ok(None) => return Ok(Value::Object(out)),
                Err(e) => {
                    self.0.note(|| e.to_string());
                    return Err(e);
                }
            };
            if !seen.insert(key.clone()) {
                let message = "is listed twice (each key of a JSON object must be unique)";
                return self.0.at(Step::Key(key), || Err(de::Error::custom(message)));
            }
            let value = self.0.at(Step::Key(key.clone()), || map.next_value_seed(self))?;
            out.insert(key, value);
        }
    }
}

/// Parses a whole document: one JSON value, optionally after a UTF-8 byte-order mark and
/// surrounded by whitespace, with no key listed twice in an object.
pub(super) fn parse(text: &str) -> Result<Value, Problem> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let reader = Reader::default();
    let mut de = serde_json::Deserializer::from_str(text);
    let value = Node(&reader).deserialize(&mut de).map_err(|e| {
        reader.problem.take().unwrap_or(Problem {
            path: String::new(),
            message: e.to_string(),
        })
    })?;
    de.end().map_err(|e| Problem {
        path: String::new(),
        message: format!("data after the JSON document ({e})"),
    })?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn problems_are_found_at_their_path() {
        assert!(problem(r#"{"a": {"b": 1, "b": 2}}"#).starts_with("a.b: is listed twice"));
        assert!(problem(r#"{"a": [1, {"c": 1, "c": 1}]}"#).starts_with("a[1].c: is listed twice"));
        assert!(problem(r#"{"a": {"b": "#).starts_with("a.b: EOF while parsing a value"));
        assert!(problem(r#"{"a": {"b": 1"#).starts_with("a: EOF while parsing an object"));
        assert!(problem(r#"{"a": [1, "#).starts_with("a[1]: EOF while parsing a value"));
        assert!(problem(r#"{"a": 1} xyz"#).starts_with("data after the JSON document"));
        assert!(problem(r#"{"a": 1} {"a": 2}"#).starts_with("data after the JSON document"));
        assert!(problem("").starts_with("EOF while parsing a value"));
    }

    #[test]
    fn a_byte_order_mark_and_whitespace_are_accepted() {
        let v = parse("\u{feff} {\"a\": [1, 2.5, -3, null, true, \"x\"]}\n").unwrap();
        assert_eq!(v, serde_json::json!({"a": [1, 2.5, -3, null, true, "x"]}));
        assert_eq!(v["a"][0].as_u64(), Some(1));
    }
}
