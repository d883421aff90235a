//! The author's kit without a VM: what a plugin author depends on links neither libvirt nor
//! hyperjob-core, and docs/plugins.md's walk-through quotes the template plugin
//! (plugins/template-backend), which CI builds with the workspace: its snippets must be the
//! template's own text, so the guide cannot drift from code that compiles.
//!
//! In the section "Your first plugin", every Rust snippet and every snippet of the template's
//! manifest is preceded by `<!-- file: PATH -->` (the snippet is the whole file) or
//! `<!-- excerpt: PATH -->` (the snippet is a contiguous part of it), and every file of the
//! template is quoted at least once.

use std::path::PathBuf;
use std::process::Command;

const SECTION: &str = "## Your first plugin";
const TEMPLATE: &str = "plugins/template-backend";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fenced block of the guide and the marker before it.
#[derive(Debug)]
struct Snippet {
    /// The line the fence starts on (1-based), for messages.
    line: usize,
    language: String,
    /// `("file" | "excerpt", path)`, if the block is marked.
    marker: Option<(String, String)>,
    text: String,
}

/// The fenced blocks of the guide's walk-through section.
fn walkthrough_snippets() -> Vec<Snippet> {
    let guide = std::fs::read_to_string(root().join("docs/plugins.md")).expect("docs/plugins.md");
    let start = guide.find(SECTION).expect("the walk-through section");
    let first_line = guide[..start].lines().count();
    let section = &guide[start..];
    let end = section[SECTION.len()..]
        .find("\n## ")
        .map_or(section.len(), |at| at + SECTION.len());
    let lines: Vec<&str> = section[..end].lines().collect();
    let mut snippets = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(language) = lines[i].strip_prefix("```") else {
            i += 1;
            continue;
        };
        let marker = i
            .checked_sub(1)
            .and_then(|before| lines[before].strip_prefix("<!-- "))
            .and_then(|m| m.strip_suffix(" -->"))
            .and_then(|m| m.split_once(": "))
            .map(|(kind, path)| (kind.to_string(), path.to_string()));
        let body_start = i + 1;
        let body_end = (body_start..lines.len())
            .find(|&j| lines[j] == "```")
            .unwrap_or_else(|| panic!("unclosed fence at line {}", first_line + i));
        snippets.push(Snippet {
            line: first_line + i,
            language: language.to_string(),
            marker,
            text: lines[body_start..body_end]
                .iter()
                .map(|l| format!("{l}\n"))
                .collect(),
        });
        i = body_end + 1;
    }
    snippets
}

/// Every file of the template a newcomer edits: its manifest and its sources.
fn template_files() -> Vec<String> {
    let mut files = vec![format!("{TEMPLATE}/Cargo.toml")];
    let src = root().join(TEMPLATE).join("src");
    let mut sources: Vec<String> = std::fs::read_dir(&src)
        .expect("template sources")
        .map(|entry| {
            let name = entry.expect("entry").file_name();
            format!("{TEMPLATE}/src/{}", name.to_string_lossy())
        })
        .collect();
    sources.sort();
    files.extend(sources);
    files
}

#[test]
fn every_snippet_of_the_walkthrough_is_the_templates_own_text() {
    let snippets = walkthrough_snippets();
    let mut wrong = Vec::new();
    for snippet in &snippets {
        let Some((kind, path)) = &snippet.marker else {
            if snippet.language == "rust" || snippet.text.contains("[package]") {
                wrong.push(format!("line {}: unmarked template snippet", snippet.line));
            }
            continue;
        };
        let file = std::fs::read_to_string(root().join(path))
            .unwrap_or_else(|err| panic!("line {}: {path}: {err}", snippet.line));
        let matches = match kind.as_str() {
            "file" => file == snippet.text,
            "excerpt" => file.contains(&snippet.text),
            other => panic!("line {}: unknown marker {other:?}", snippet.line),
        };
        if !matches {
            wrong.push(format!(
                "line {}: the snippet is not {} {path}",
                snippet.line,
                if kind == "file" {
                    "the text of"
                } else {
                    "a part of"
                }
            ));
        }
    }

    assert!(
        wrong.is_empty(),
        "docs/plugins.md and {TEMPLATE} differ:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_walkthrough_quotes_every_file_of_the_template() {
    let quoted: Vec<String> = walkthrough_snippets()
        .into_iter()
        .filter_map(|s| s.marker.map(|(_, path)| path))
        .collect();

    let missing: Vec<String> = template_files()
        .into_iter()
        .filter(|file| !quoted.contains(file))
        .collect();

    assert!(
        missing.is_empty(),
        "not quoted in docs/plugins.md: {missing:?}"
    );
}

/// The packages `package` depends on (normal dependencies, all features), one name each.
fn dependency_names(package: &str) -> Vec<String> {
    let output = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args([
            "tree",
            "--offline",
            "--locked",
            "--all-features",
            "-e",
            "normal",
        ])
        .args(["--prefix", "none", "--format", "{p}", "-p", package])
        .current_dir(root())
        .output()
        .expect("run cargo tree");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_contract_crate_and_the_template_link_neither_libvirt_nor_the_host() {
    for package in ["hyperjob-plugin", "hyperjob-backend-template"] {
        let names = dependency_names(package);

        assert!(names.contains(&"serde".to_string()), "{package}: {names:?}");
        let unwanted: Vec<&String> = names
            .iter()
            .filter(|name| name.contains("virt") || name.as_str() == "hyperjob-core")
            .collect();
        assert!(unwanted.is_empty(), "{package} depends on {unwanted:?}");
    }
}
