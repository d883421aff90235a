//! The types that cross the shared-library boundary, and the text their fingerprint is made of.
//!
//! A plugin library and hyperjob exchange these types by value and by reference (trait objects,
//! requests, errors, the registrar), so both sides must agree on every one of them, field by
//! field and method by method. hyperjob-plugin's build script (`build.rs`, which includes this
//! file) extracts their definitions from the source, normalises them to tokens (comments,
//! doc comments, formatting and attributes other than `#[repr]` do not count) and hashes the
//! result into [`super::BOUNDARY_FINGERPRINT`], which every plugin header carries. A plugin
//! built against a core whose boundary types differ in any token is refused.
//!
//! Why source text and not a hand-written layout description: nothing has to be kept in sync
//! by hand. What could drift is the *list* below; the tests check that every type of this
//! crate that a boundary item mentions is itself on the list, and that no boundary item
//! mentions a type of another crate (whose layout the fingerprint would not see; std's is
//! pinned by the rustc commit in the header).
//!
//! This file is compiled twice — into the build script and into the library — so it uses
//! nothing but `std`.

/// Every item whose definition crosses the boundary, by file below `crates/plugin/src`.
pub const BOUNDARY: &[(&str, &[&str])] = &[
    (
        "plugin.rs",
        &[
            "PluginError",
            "VmRequest",
            "OwnedVm",
            "VmPresence",
            "Check",
            "Progress",
            "Backend",
            "ScriptRequest",
            "Upload",
            "RemoteExit",
            "Transport",
            "Connection",
        ],
    ),
    ("endpoint.rs", &["EndpointKind", "Address", "Endpoint"]),
    ("context.rs", &["PluginContext", "GuestKeyMode"]),
    ("keys.rs", &["GuestKeys", "KeyPair", "Secret"]),
    (
        "abi.rs",
        &["PluginRegistrar", "LibraryBackendFn", "LibraryTransportFn"],
    ),
];

/// Roots of paths that are not another crate.
const OWN_ROOTS: &[&str] = &["std", "core", "alloc", "crate", "self", "super", "Self"];

/// The normalised text of every boundary item (and of the `use` declarations that name what
/// they refer to), one line per item. `read` gets a path below `crates/plugin/src`.
pub fn boundary_text(read: &dyn Fn(&str) -> Result<String, String>) -> Result<String, String> {
    let mut out = String::new();
    for (file, names) in BOUNDARY {
        let tokens = tokens(&read(file)?);
        let mut used = Vec::new();
        for name in *names {
            let item = item(&tokens, name)
                .ok_or_else(|| format!("boundary item {name} is not defined in src/{file}"))?;
            used.extend(item.iter().filter(|t| is_ident(t)).cloned());
            out.push_str(&format!("{file} {name}: {}\n", item.join(" ")));
        }
        for declaration in uses(&tokens) {
            let names_something = declaration
                .iter()
                .any(|t| is_ident(t) && !OWN_ROOTS.contains(&t.as_str()) && used.contains(t));
            if names_something {
                out.push_str(&format!("{file} use: {}\n", declaration.join(" ")));
            }
        }
    }
    Ok(out)
}

/// Whether a token is an identifier (or keyword).
pub fn is_ident(token: &str) -> bool {
    token
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
}

/// The source's tokens, without comments or whitespace: identifiers and numbers, string and
/// character literals, lifetimes, and every other character on its own.
pub fn tokens(source: &str) -> Vec<String> {
    let chars: Vec<char> = source.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            continue;
        }
        if c == 'r' && (at(i + 1) == '"' || (at(i + 1) == '#' && matches!(at(i + 2), '"' | '#'))) {
            let hashes = chars[i + 1..].iter().take_while(|c| **c == '#').count();
            i += 1 + hashes + 1;
            while i < chars.len() && !(chars[i] == '"' && (1..=hashes).all(|h| at(i + h) == '#')) {
                i += 1;
            }
            i = (i + 1 + hashes).min(chars.len());
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i = (i + 1).min(chars.len());
        } else if c == '\'' && (at(i + 1) == '\\' || at(i + 2) == '\'') {
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i = (i + 1).min(chars.len());
        } else if c == '\'' || c.is_alphanumeric() || c == '_' {
            i += 1;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else {
            i += 1;
        }
        out.push(chars[start..i.min(chars.len())].iter().collect());
    }
    out
}

/// Where the attribute `# [ … ]` starting at `start` ends (one past its `]`).
fn attribute_end(tokens: &[String], start: usize) -> Option<usize> {
    if tokens.get(start)? != "#" {
        return None;
    }
    let open = if tokens.get(start + 1)? == "!" {
        start + 2
    } else {
        start + 1
    };
    if tokens.get(open)? != "[" {
        return None;
    }
    let mut depth = 0;
    for (i, token) in tokens.iter().enumerate().skip(open) {
        match token.as_str() {
            "[" => depth += 1,
            "]" => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// The item's tokens without attributes other than `#[repr(…)]`: from its outer attributes
/// through its closing `}` or `;`. `None` if `pub struct|enum|trait|type NAME` is not there.
pub fn item(tokens: &[String], name: &str) -> Option<Vec<String>> {
    let start = (0..tokens.len()).find(|&i| {
        tokens[i] == "pub"
            && matches!(
                tokens.get(i + 1).map(String::as_str),
                Some("struct" | "enum" | "trait" | "type")
            )
            && tokens.get(i + 2).map(String::as_str) == Some(name)
    })?;
    let mut depth = 0i32;
    let mut end = None;
    for (i, token) in tokens.iter().enumerate().skip(start) {
        match token.as_str() {
            "(" | "[" | "{" => depth += 1,
            ")" | "]" => depth -= 1,
            "}" => {
                depth -= 1;
                if depth == 0 {
                    end = Some(i + 1);
                    break;
                }
            }
            ";" if depth == 0 => {
                end = Some(i + 1);
                break;
            }
            _ => {}
        }
    }
    // Outer attributes: walk back over `# [ … ]` groups directly before the item.
    let mut outer = Vec::new();
    let mut first = start;
    'back: while first > 0 && tokens[first - 1] == "]" {
        for open in (0..first - 1).rev() {
            if attribute_end(tokens, open) == Some(first) {
                outer.push(open..first);
                first = open;
                continue 'back;
            }
        }
        break;
    }
    let mut out: Vec<String> = Vec::new();
    for range in outer.into_iter().rev() {
        if tokens.get(range.start + 2).map(String::as_str) == Some("repr") {
            out.extend(tokens[range].iter().cloned());
        }
    }
    let body = &tokens[start..end?];
    let mut i = 0;
    while i < body.len() {
        match attribute_end(body, i) {
            Some(after) if body.get(i + 2).map(String::as_str) == Some("repr") => {
                out.extend(body[i..after].iter().cloned());
                i = after;
            }
            Some(after) => i = after,
            None => {
                out.push(body[i].clone());
                i += 1;
            }
        }
    }
    Some(out)
}

/// The `use` declarations at the top level of a file, each as its tokens.
pub fn uses(tokens: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut i = 0;
    while i < tokens.len() {
        match tokens[i].as_str() {
            "{" => depth += 1,
            "}" => depth -= 1,
            "use" if depth == 0 => {
                let end = tokens[i..]
                    .iter()
                    .position(|t| t == ";")
                    .map_or(tokens.len(), |p| i + p + 1);
                out.push(tokens[i..end].to_vec());
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// The capitalised identifiers an item uses as types (enum variant declarations and `Self`
/// left out).
pub fn referenced_types(item: &[String]) -> Vec<String> {
    let is_enum = item.iter().take_while(|t| *t != "{").any(|t| t == "enum");
    let mut depth = 0i32;
    let mut out = Vec::new();
    for (i, token) in item.iter().enumerate() {
        match token.as_str() {
            "(" | "[" | "{" => depth += 1,
            ")" | "]" | "}" => depth -= 1,
            _ => {}
        }
        let variant = is_enum && depth == 1 && i > 0 && matches!(item[i - 1].as_str(), "{" | ",");
        let capitalised = token.starts_with(|c: char| c.is_ascii_uppercase());
        if capitalised && !variant && token != "Self" && !out.contains(token) {
            out.push(token.clone());
        }
    }
    out
}

/// The first segments of the paths an item uses that name another crate (`toml::Table`).
pub fn foreign_path_roots(item: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..item.len() {
        let starts_path = item.get(i + 1).map(String::as_str) == Some(":")
            && item.get(i + 2).map(String::as_str) == Some(":");
        let continues_path = i >= 2 && item[i - 1] == ":" && item[i - 2] == ":";
        let token = &item[i];
        if starts_path
            && !continues_path
            && is_ident(token)
            && !token.starts_with(|c: char| c.is_ascii_uppercase())
            && !OWN_ROOTS.contains(&token.as_str())
        {
            out.push(token.clone());
        }
    }
    out
}

/// The names a `use` declaration brings in from another crate (`use serde::{A, B};` → A, B).
pub fn foreign_imports(declaration: &[String]) -> Vec<String> {
    let root = declaration
        .iter()
        .skip_while(|t| *t != "use")
        .skip(1)
        .find(|t| is_ident(t))
        .map(String::as_str);
    if root.is_none_or(|root| OWN_ROOTS.contains(&root)) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (i, token) in declaration.iter().enumerate() {
        let last_segment = !matches!(declaration.get(i + 1).map(String::as_str), Some(":" | "as"));
        let keyword = matches!(token.as_str(), "use" | "as" | "self" | "pub" | "crate");
        if is_ident(token) && last_segment && !keyword {
            out.push(token.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The normalised text of `VmRequest` in `source`.
    fn text_of(source: &str) -> String {
        item(&tokens(source), "VmRequest")
            .expect("VmRequest is defined")
            .join(" ")
    }

    const BASE: &str = r#"
use std::fmt;

/// What a backend needs.
#[derive(Debug, Clone)]
pub struct VmRequest {
    /// The name.
    pub vm_name: String, // trailing
    #[serde(default)]
    pub job_id: u64,
}

pub struct Other;
"#;

    #[test]
    fn items_are_tokens_without_comments_docs_or_attributes() {
        assert_eq!(
            text_of(BASE),
            "pub struct VmRequest { pub vm_name : String , pub job_id : u64 , }"
        );
    }

    #[test]
    fn formatting_and_comments_do_not_change_an_item() {
        let reformatted = "/* header */ #[derive(Debug)]\npub struct   VmRequest{pub vm_name:String,\n  // note\n pub job_id:u64,}";

        assert_eq!(text_of(reformatted), text_of(BASE));
    }

    #[test]
    fn a_changed_field_changes_the_item() {
        for changed in [
            BASE.replace("job_id: u64", "job_id: u32"),
            BASE.replace("pub job_id: u64,", "pub job_id: u64,\n    pub extra: bool,"),
            BASE.replace(
                "pub vm_name: String, // trailing\n    #[serde(default)]\n    pub job_id: u64,",
                "pub job_id: u64,\n    pub vm_name: String,",
            ),
        ] {
            assert_ne!(text_of(&changed), text_of(BASE), "{changed}");
        }
    }

    #[test]
    fn repr_attributes_count() {
        let with_repr = BASE.replace("#[derive(Debug, Clone)]", "#[derive(Debug)]\n#[repr(C)]");

        assert_eq!(
            text_of(&with_repr),
            format!("# [ repr ( C ) ] {}", text_of(BASE))
        );
    }

    #[test]
    fn strings_with_comment_markers_and_char_literals_are_kept_whole() {
        let tokens =
            tokens(r##"let a = "x // y"; let b = '"'; let c: &'a str = r#"q"# ; // gone"##);

        assert!(tokens.contains(&"\"x // y\"".to_string()), "{tokens:?}");
        assert!(tokens.contains(&"'\"'".to_string()), "{tokens:?}");
        assert!(tokens.contains(&"'a".to_string()), "{tokens:?}");
        assert!(tokens.contains(&"r#\"q\"#".to_string()), "{tokens:?}");
        assert!(!tokens.iter().any(|t| t == "gone"), "{tokens:?}");
    }

    #[test]
    fn enum_variants_are_not_type_references() {
        let source = "pub enum VmRequest { Config(String), Owned(OwnedVm), Absent, Timeout { what: String, secs: u64 } }";
        let tokens = tokens(source);

        let types = referenced_types(&item(&tokens, "VmRequest").expect("item"));

        assert_eq!(types, ["VmRequest", "String", "OwnedVm"]);
    }

    #[test]
    fn foreign_paths_and_imports_are_recognised() {
        let tokens = tokens("pub struct VmRequest { a: toml::Table, b: crate::keys::GuestKeys, c: std::path::PathBuf, d: PluginError::X }");
        let item = item(&tokens, "VmRequest").expect("item");

        assert_eq!(foreign_path_roots(&item), ["toml"]);
        assert_eq!(
            foreign_imports(&super::tokens("use serde::{Deserialize, Serialize as S};")),
            ["Deserialize", "S"]
        );
        assert!(foreign_imports(&super::tokens("use crate::plugin::{Backend};")).is_empty());
        assert!(foreign_imports(&super::tokens("use std::fmt;")).is_empty());
    }

    fn source_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
    }

    fn read(file: &str) -> Result<String, String> {
        std::fs::read_to_string(source_dir().join(file)).map_err(|err| err.to_string())
    }

    /// Every `struct`, `enum`, `trait`, `type` or `union` defined anywhere in this crate.
    fn types_defined_in_this_crate() -> Vec<String> {
        let mut files = vec![source_dir()];
        let mut defined = Vec::new();
        while let Some(path) = files.pop() {
            if path.is_dir() {
                for entry in std::fs::read_dir(&path).expect("read src") {
                    files.push(entry.expect("entry").path());
                }
                continue;
            }
            let tokens = tokens(&std::fs::read_to_string(&path).expect("read source"));
            for pair in tokens.windows(2) {
                if matches!(
                    pair[0].as_str(),
                    "struct" | "enum" | "trait" | "type" | "union"
                ) {
                    defined.push(pair[1].clone());
                }
            }
        }
        defined
    }

    /// The list cannot drift: a boundary item that starts to use another type of this crate
    /// (a new field of type `crate::x::Y`) fails here until `Y` is on the list too.
    #[test]
    fn every_type_of_this_crate_a_boundary_item_uses_is_on_the_list() {
        let defined = types_defined_in_this_crate();
        let listed: Vec<&str> = BOUNDARY
            .iter()
            .flat_map(|(_, names)| names.iter().copied())
            .collect();
        let mut missing = Vec::new();
        for (file, names) in BOUNDARY {
            let tokens = tokens(&read(file).expect("read"));
            for name in *names {
                let item = item(&tokens, name).expect("boundary item");
                for used in referenced_types(&item) {
                    if defined.contains(&used) && !listed.contains(&used.as_str()) {
                        missing.push(format!("{name} (src/{file}) uses {used}"));
                    }
                }
            }
        }

        assert!(
            missing.is_empty(),
            "add these to BOUNDARY in src/abi/boundary.rs: {missing:?}"
        );
    }

    /// Types of other crates are not fingerprinted (only their name would be): a boundary item
    /// must not use any. Derives and other attributes do not count (they are not layout).
    #[test]
    fn no_boundary_item_uses_a_type_of_another_crate() {
        let mut found = Vec::new();
        for (file, names) in BOUNDARY {
            let tokens = tokens(&read(file).expect("read"));
            let imported: Vec<String> = uses(&tokens)
                .iter()
                .flat_map(|declaration| foreign_imports(declaration))
                .collect();
            for name in *names {
                let item = item(&tokens, name).expect("boundary item");
                for root in foreign_path_roots(&item) {
                    found.push(format!("{name} (src/{file}) uses the path {root}::…"));
                }
                for token in &item {
                    if imported.contains(token) {
                        found.push(format!("{name} (src/{file}) uses the imported {token}"));
                    }
                }
            }
        }

        assert!(found.is_empty(), "{found:?}");
    }

    /// The fingerprint compiled into this crate is the one of its sources now (the build
    /// script reruns whenever a boundary file changes).
    #[test]
    fn the_compiled_fingerprint_is_that_of_the_current_sources() {
        use sha2::Digest as _;
        let text = boundary_text(&read).expect("boundary text");
        let digest = sha2::Sha256::digest(text.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();

        assert_eq!(super::super::BOUNDARY_FINGERPRINT, format!("sha256:{hex}"));
        for (_, names) in BOUNDARY {
            for name in *names {
                assert!(text.contains(&format!(" {name}: pub ")), "{name}");
            }
        }
    }
}
