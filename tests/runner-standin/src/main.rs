//! A stand-in for `gitlab-runner`, for hyperjob's end-to-end tests (issue 11 §6).
//!
//! - `spawn PROGRAM ARGS...`: runs PROGRAM as its child and exits as it did. The test harness
//!   calls hyperjob through it, so that hyperjob's caller is an executable named
//!   `gitlab-runner`, as under GitLab Runner.
//! - `--version`, `artifacts-uploader`, `artifacts-downloader`, `cache-archiver`,
//!   `cache-extractor`: what the runner's stage scripts call inside the build environment. They
//!   check their arguments and the files they name, and report on stdout (the job log); the
//!   archives are manifests (one `path<TAB>bytes` line per file), and nothing is sent anywhere.

use std::path::Path;
use std::process::{Command, ExitCode};

const VERSION: &str = "19.4.0~hyperjob-standin";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = match args.split_first() {
        Some((command, rest)) => (command.as_str(), rest),
        None => ("", &[][..]),
    };
    let result = match command {
        "--version" | "-v" | "version" => {
            println!("Version:      {VERSION}");
            println!("Git revision: standin");
            println!("OS/Arch:      linux/{}", std::env::consts::ARCH);
            Ok(0)
        }
        "spawn" => spawn(rest),
        "artifacts-uploader" => artifacts_uploader(&Flags::parse(rest)),
        "artifacts-downloader" => {
            let flags = Flags::parse(rest);
            println!("standin artifacts-downloader: job {}", flags.one("--id"));
            Ok(0)
        }
        "cache-archiver" => cache_archiver(&Flags::parse(rest)),
        "cache-extractor" => cache_extractor(&Flags::parse(rest)),
        other => Err(format!("unknown command {other:?}")),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(message) => {
            eprintln!("gitlab-runner (standin): {message}");
            ExitCode::from(2)
        }
    }
}

/// Runs `args[0]` with the rest as its child; its exit code, or 128 + the signal that ended it.
fn spawn(args: &[String]) -> Result<u8, String> {
    use std::os::unix::process::ExitStatusExt;
    let (program, rest) = args.split_first().ok_or("spawn needs a program")?;
    let status = Command::new(program)
        .args(rest)
        .status()
        .map_err(|err| format!("cannot start {program}: {err}"))?;
    let code = status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1);
    Ok(u8::try_from(code).unwrap_or(1))
}

/// `--name value` flags (repeatable) and bare `--flag`s.
struct Flags(Vec<(String, Option<String>)>);

impl Flags {
    fn parse(args: &[String]) -> Self {
        const BARE: &[&str] = &["--untracked", "--generate-artifacts-metadata"];
        let mut flags = Vec::new();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            if BARE.contains(&arg.as_str()) {
                flags.push((arg.clone(), None));
            } else {
                flags.push((arg.clone(), args.next().cloned()));
            }
        }
        Self(flags)
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(flag, _)| flag == name)
            .filter_map(|(_, value)| value.as_deref())
            .collect()
    }

    fn one(&self, name: &str) -> &str {
        self.all(name).first().copied().unwrap_or("")
    }

    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(flag, _)| flag == name)
    }
}

/// Every regular file below `path` (or `path` itself), with its size.
fn files(path: &Path, out: &mut Vec<(String, u64)>) {
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if meta.is_dir() {
        let Ok(entries) = std::fs::read_dir(path) else {
            return;
        };
        let mut entries: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
        entries.sort();
        for entry in entries {
            files(&entry, out);
        }
    } else if meta.is_file() {
        out.push((path.display().to_string(), meta.len()));
    }
}

/// The files the `--path`s name, relative to the working directory (the project dir).
fn matched(flags: &Flags) -> Vec<(String, u64)> {
    let mut found = Vec::new();
    for path in flags.all("--path") {
        let before = found.len();
        files(Path::new(path), &mut found);
        if found.len() == before {
            println!("WARNING: {path}: no matching files");
        }
    }
    found
}

fn manifest(found: &[(String, u64)]) -> String {
    found
        .iter()
        .map(|(path, size)| format!("{path}\t{size}\n"))
        .collect()
}

fn artifacts_uploader(flags: &Flags) -> Result<u8, String> {
    for required in ["--url", "--token", "--id"] {
        if flags.one(required).is_empty() {
            return Err(format!("artifacts-uploader needs {required}"));
        }
    }
    let found = matched(flags);
    if found.is_empty() {
        println!("ERROR: No files to upload");
        return Ok(1);
    }
    let bytes: u64 = found.iter().map(|(_, size)| size).sum();
    let name = flags.one("--name");
    println!(
        "standin artifacts-uploader: job {} artifacts {:?} ({} file(s), {bytes} bytes) for {}",
        flags.one("--id"),
        if name.is_empty() { "artifacts" } else { name },
        found.len(),
        flags.one("--url"),
    );
    print!("{}", manifest(&found));
    Ok(0)
}

fn cache_archiver(flags: &Flags) -> Result<u8, String> {
    let file = flags.one("--file");
    if file.is_empty() || flags.one("--timeout").is_empty() {
        return Err("cache-archiver needs --file and --timeout".to_string());
    }
    let found = matched(flags);
    if found.is_empty() && !flags.has("--untracked") {
        println!("WARNING: no files to cache");
    }
    let archive = Path::new(file);
    if let Some(parent) = archive.parent() {
        std::fs::create_dir_all(parent).map_err(|err| format!("cannot create {file}: {err}"))?;
    }
    std::fs::write(archive, manifest(&found))
        .map_err(|err| format!("cannot write {file}: {err}"))?;
    println!(
        "standin cache-archiver: {file} with {} file(s)",
        found.len()
    );
    Ok(0)
}

fn cache_extractor(flags: &Flags) -> Result<u8, String> {
    let file = flags.one("--file");
    if file.is_empty() || flags.one("--timeout").is_empty() {
        return Err("cache-extractor needs --file and --timeout".to_string());
    }
    match std::fs::read_to_string(file) {
        Ok(manifest) => {
            println!(
                "standin cache-extractor: {file} with {} file(s)",
                manifest.lines().count()
            );
            Ok(0)
        }
        Err(_) => {
            println!("WARNING: {file}: cache not found");
            Ok(1)
        }
    }
}
