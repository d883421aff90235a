//! Reads one exported symbol's bytes from a shared-library file without loading it.
//!
//! hyperjob reads a plugin library's [`super::PluginHeader`] this way, so a library that is not
//! selected, or that the gate refuses, is never loaded: none of its code (initialisers
//! included) runs, and its dependencies need not even exist. Only what the host itself is made
//! of is read (ELF64 in the host's byte order); every offset and size is checked against the
//! file, and nothing larger than a few MiB is read.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

const SHT_DYNSYM: u32 = 11;
const SHT_NOBITS: u32 = 8;
const SHN_UNDEF: u16 = 0;
const SHN_LORESERVE: u16 = 0xff00;
const SECTION_HEADER: u64 = 64;
const SYMBOL: u64 = 24;
/// Larger dynamic symbol or string tables than this are not a plugin's.
const MAX_TABLE: u64 = 16 << 20;
/// Larger symbols than this are not a header.
const MAX_SYMBOL: u64 = 64 << 10;

/// Why a symbol could not be read, in words.
pub type Reason = String;

struct Elf {
    file: File,
    len: u64,
}

struct Section {
    kind: u32,
    addr: u64,
    offset: u64,
    size: u64,
    link: u32,
}

impl Elf {
    fn read(&self, offset: u64, len: u64, what: &str) -> Result<Vec<u8>, Reason> {
        let end = offset
            .checked_add(len)
            .filter(|end| *end <= self.len)
            .ok_or_else(|| format!("its {what} lies outside the file (a truncated file?)"))?;
        let mut buf = vec![0u8; usize::try_from(end - offset).map_err(|e| e.to_string())?];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|err| format!("cannot read its {what}: {err}"))?;
        Ok(buf)
    }

    fn section(&self, table: u64, count: u16, index: u16) -> Result<Section, Reason> {
        if index >= count {
            return Err(format!("section {index} does not exist"));
        }
        let raw = self.read(
            table + u64::from(index) * SECTION_HEADER,
            SECTION_HEADER,
            "section headers",
        )?;
        Ok(Section {
            kind: u32_at(&raw, 4),
            addr: u64_at(&raw, 16),
            offset: u64_at(&raw, 24),
            size: u64_at(&raw, 32),
            link: u32_at(&raw, 40),
        })
    }
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_ne_bytes(b)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_ne_bytes(b)
}

/// What reading found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// The symbol's bytes.
    Symbol(Vec<u8>),
    /// A readable shared library that does not export the symbol.
    Missing,
}

/// The bytes of the exported, defined data symbol `name` in the shared library at `path`.
pub fn exported_symbol(path: &Path, name: &str) -> Result<Found, Reason> {
    let file = File::open(path).map_err(|err| format!("cannot open it: {err}"))?;
    let len = file
        .metadata()
        .map_err(|err| format!("cannot read it: {err}"))?
        .len();
    let elf = Elf { file, len };
    let ident = elf
        .read(0, 64, "ELF header")
        .map_err(|_| "it is not an ELF file".to_string())?;
    if ident[..4] != *b"\x7fELF" {
        return Err("it is not an ELF file".to_string());
    }
    let host_data = if cfg!(target_endian = "little") { 1 } else { 2 };
    if ident[4] != 2 || ident[5] != host_data {
        return Err(format!(
            "it is not a 64-bit {}-endian ELF file like this hyperjob",
            if host_data == 1 { "little" } else { "big" }
        ));
    }
    if u16_at(&ident, 16) != 3 {
        return Err("it is not a shared library (ELF type is not ET_DYN)".to_string());
    }
    let table = u64_at(&ident, 0x28);
    let entry_size = u16_at(&ident, 0x3a);
    let count = u16_at(&ident, 0x3c);
    if table == 0 || count == 0 || count >= SHN_LORESERVE {
        return Err("it has no section headers (stripped with sstrip?)".to_string());
    }
    if u64::from(entry_size) != SECTION_HEADER {
        return Err(format!(
            "its section headers are {entry_size} bytes, not 64"
        ));
    }
    let dynsym = (0..count)
        .map(|index| elf.section(table, count, index))
        .find(|section| section.as_ref().map_or(true, |s| s.kind == SHT_DYNSYM))
        .ok_or_else(|| "it has no dynamic symbol table".to_string())??;
    let link = u16::try_from(dynsym.link).map_err(|_| "its symbol table is corrupt".to_string())?;
    let strings = elf.section(table, count, link)?;
    if dynsym.size > MAX_TABLE || strings.size > MAX_TABLE {
        return Err("its dynamic symbol table is implausibly large".to_string());
    }
    let symbols = elf.read(dynsym.offset, dynsym.size, "dynamic symbol table")?;
    let names = elf.read(strings.offset, strings.size, "dynamic string table")?;
    for symbol in symbols.chunks_exact(SYMBOL as usize) {
        let name_at = u32_at(symbol, 0) as usize;
        let shndx = u16_at(symbol, 6);
        if shndx == SHN_UNDEF || shndx >= SHN_LORESERVE || !names_match(&names, name_at, name) {
            continue;
        }
        let (value, size) = (u64_at(symbol, 8), u64_at(symbol, 16));
        if size == 0 || size > MAX_SYMBOL {
            return Err(format!("its {name} has an implausible size ({size} bytes)"));
        }
        let section = elf.section(table, count, shndx)?;
        if section.kind == SHT_NOBITS {
            return Err(format!("its {name} has no contents in the file"));
        }
        let within = value
            .checked_sub(section.addr)
            .filter(|at| at.checked_add(size).is_some_and(|end| end <= section.size))
            .ok_or_else(|| format!("its {name} lies outside its section"))?;
        return elf
            .read(section.offset + within, size, name)
            .map(Found::Symbol);
    }
    Ok(Found::Missing)
}

fn names_match(table: &[u8], at: usize, name: &str) -> bool {
    let Some(rest) = table.get(at..) else {
        return false;
    };
    rest.len() > name.len() && rest.starts_with(name.as_bytes()) && rest[name.len()] == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The libc this test runs with: a real shared library with a dynamic symbol table.
    fn libc() -> std::path::PathBuf {
        [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/aarch64-linux-gnu/libc.so.6",
            "/lib64/libc.so.6",
        ]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.is_file())
        .expect("a libc.so.6")
    }

    #[test]
    fn a_data_symbol_is_read_from_a_real_library() {
        // glibc exports the read-only data symbol `_nl_default_dirname`: "/usr/share/locale".
        let found = exported_symbol(&libc(), "_nl_default_dirname").expect("read");

        let Found::Symbol(bytes) = found else {
            panic!("not found")
        };
        assert!(bytes.starts_with(b"/usr/share/locale"), "{bytes:?}");
    }

    #[test]
    fn a_library_without_the_symbol_says_so() {
        assert_eq!(
            exported_symbol(&libc(), "HYPERJOB_PLUGIN_HEADER").expect("read"),
            Found::Missing
        );
    }

    #[test]
    fn files_that_are_no_shared_library_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = dir.path().join("libtext.so");
        std::fs::write(&text, b"not an ELF file").expect("write");
        let truncated = dir.path().join("libcut.so");
        let bytes = std::fs::read(libc()).expect("libc");
        std::fs::write(&truncated, &bytes[..4096]).expect("write");
        let executable = std::env::current_exe().expect("this test");

        assert_eq!(
            exported_symbol(&text, "x").expect_err("text"),
            "it is not an ELF file"
        );
        assert!(exported_symbol(&truncated, "x")
            .expect_err("cut")
            .contains("outside the file"));
        // A position-independent executable is ET_DYN too; reading it is harmless.
        let _ = exported_symbol(&executable, "x");
        assert!(exported_symbol(&dir.path().join("missing.so"), "x")
            .expect_err("missing")
            .starts_with("cannot open it"));
    }
}
