//! Reading Hearth's TOML files (the agent's configuration, job specs) with errors people can act
//! on: the dotted path of the offending field and what was expected, on one line.

use serde::de::DeserializeOwned;

/// Parses `text` as `T`. The error names the field (such as `` `api.port`: invalid type… ``) and,
/// where the parser knows it, the byte offset; it never spans several lines.
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let deserializer = toml::Deserializer::parse(text).map_err(|e| one_line(&e))?;
    // serde_path_to_error adds the dotted path of the field, which toml's own message leaves out
    // for type and range errors.
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = e.path().to_string();
        let message = one_line(e.inner());
        if field == "." { message } else { format!("`{field}`: {message}") }
    })
}

fn one_line(e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => format!("{message} (at byte {})", span.start),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        inner: Inner,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        port: u16,
    }

    #[test]
    fn errors_name_the_dotted_field_on_one_line() {
        for (text, expected) in [
            ("[inner]\nport = \"x\"\n", "`inner.port`"),
            ("[inner]\nport = 70000\n", "`inner.port`"),
            ("[inner]\nprot = 1\n", "prot"),
            ("[inner\n", "(at byte"),
        ] {
            let err = parse::<Outer>(text).unwrap_err();
            assert!(err.contains(expected), "{text:?} gave {err:?}");
            assert!(!err.contains('\n'), "{err:?}");
        }
    }
}
