//! The libvirt domain XML for one job's VM, built as a pure function of its inputs.

use std::fmt::Write as _;
use std::path::Path;

use crate::config::{DirectBoot, DomainType};
use crate::machine::{self, Machine};
use crate::network::{interface_xml, Nic};

/// XML namespace of hyperjob's `<metadata>` element on every domain it creates.
pub const METADATA_NS: &str = "http://hyperjob.dev/xmlns/job/1";

/// Everything the domain XML is made of.
#[derive(Debug, Clone)]
pub struct DomainSpec<'a> {
    pub name: &'a str,
    pub domain_type: DomainType,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub overlay: &'a Path,
    /// The network interface (crate::network).
    pub nic: Nic<'a>,
    pub direct_boot: Option<&'a DirectBoot>,
    /// Architecture, CPU and firmware.
    pub machine: &'a Machine,
    /// The VM's UEFI variable store (used with `firmware = "efi"` only).
    pub nvram: &'a Path,
    pub console_log: &'a Path,
    /// A cloud-init seed to attach read-only as a second disk.
    pub seed: Option<&'a Path>,
    pub job_id: u64,
    pub created_unix: u64,
    pub deadline_unix: u64,
    /// The installation that made the VM (`VmRequest::owner`).
    pub owner: &'a str,
}

/// hyperjob's ownership record as the `<hyperjob:job>` element libvirt keeps as the domain's
/// metadata (namespace [`METADATA_NS`]), each line indented by `indent`.
pub fn metadata_element(job_id: u64, times: (u64, u64), owner: &str, indent: &str) -> String {
    let mut xml = String::new();
    let _ = writeln!(xml, "{indent}<hyperjob:job xmlns:hyperjob='{METADATA_NS}'>");
    let _ = writeln!(xml, "{indent}  <hyperjob:id>{job_id}</hyperjob:id>");
    let _ = writeln!(
        xml,
        "{indent}  <hyperjob:created>{}</hyperjob:created>",
        times.0
    );
    let _ = writeln!(
        xml,
        "{indent}  <hyperjob:deadline>{}</hyperjob:deadline>",
        times.1
    );
    let _ = writeln!(
        xml,
        "{indent}  <hyperjob:owner>{}</hyperjob:owner>",
        escape(owner)
    );
    let _ = writeln!(xml, "{indent}</hyperjob:job>");
    xml
}

/// The same record as [`metadata_element`], for `virDomainSetMetadata`: without prefix and
/// namespace declaration, which libvirt adds itself (it refuses an element that has them).
pub fn metadata_for_set(job_id: u64, times: (u64, u64), owner: &str) -> String {
    format!(
        "<job><id>{job_id}</id><created>{}</created><deadline>{}</deadline><owner>{}</owner></job>",
        times.0,
        times.1,
        escape(owner)
    )
}

/// Renders the domain XML. Every value from outside is escaped.
pub fn domain_xml(spec: &DomainSpec<'_>) -> String {
    let mut xml = String::new();
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(xml, "<domain type='{}'>", spec.domain_type.as_str());
    let _ = writeln!(xml, "  <name>{}</name>", escape(spec.name));
    let _ = writeln!(xml, "  <metadata>");
    xml.push_str(&metadata_element(
        spec.job_id,
        (spec.created_unix, spec.deadline_unix),
        spec.owner,
        "    ",
    ));
    let _ = writeln!(xml, "  </metadata>");
    let _ = writeln!(xml, "  <memory unit='MiB'>{}</memory>", spec.memory_mib);
    let _ = writeln!(xml, "  <vcpu>{}</vcpu>", spec.vcpus);
    machine::write_os(&mut xml, spec.machine, spec.nvram, spec.direct_boot);
    machine::write_cpu(&mut xml, spec.machine);
    machine::write_features(&mut xml, spec.machine);
    let _ = writeln!(xml, "  <on_poweroff>destroy</on_poweroff>");
    let _ = writeln!(xml, "  <on_reboot>restart</on_reboot>");
    let _ = writeln!(xml, "  <on_crash>destroy</on_crash>");
    let _ = writeln!(xml, "  <devices>");
    let _ = writeln!(xml, "    <disk type='file' device='disk'>");
    let _ = writeln!(
        xml,
        "      <driver name='qemu' type='qcow2' discard='unmap'/>"
    );
    let _ = writeln!(xml, "      <source file='{}'/>", escape_path(spec.overlay));
    let _ = writeln!(xml, "      <target dev='vda' bus='virtio'/>");
    let _ = writeln!(xml, "    </disk>");
    if let Some(seed) = spec.seed {
        let _ = writeln!(xml, "    <disk type='file' device='disk'>");
        let _ = writeln!(xml, "      <driver name='qemu' type='raw'/>");
        let _ = writeln!(xml, "      <source file='{}'/>", escape_path(seed));
        let _ = writeln!(xml, "      <target dev='vdb' bus='virtio'/>");
        let _ = writeln!(xml, "      <readonly/>");
        let _ = writeln!(xml, "    </disk>");
    }
    xml.push_str(&interface_xml(&spec.nic));
    let _ = writeln!(xml, "    <serial type='pty'>");
    let _ = writeln!(
        xml,
        "      <log file='{}' append='off'/>",
        escape_path(spec.console_log)
    );
    let _ = writeln!(xml, "    </serial>");
    let _ = writeln!(xml, "    <console type='pty'/>");
    let _ = writeln!(
        xml,
        "    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"
    );
    let _ = writeln!(xml, "    <memballoon model='none'/>");
    let _ = writeln!(xml, "  </devices>");
    let _ = writeln!(xml, "</domain>");
    xml
}

/// The ownership record read back from a domain's hyperjob metadata element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataRecord {
    pub job_id: u64,
    pub created_unix: u64,
    pub deadline_unix: u64,
    /// `None` for a domain of a hyperjob that recorded no owner.
    pub owner: Option<String>,
}

/// Parses the metadata element as libvirt returns it (libvirt may re-serialise it with its own
/// namespace prefix, quoting and character references, so only the element names, the numbers
/// and the owner's text are relied on). An owner that is not well-formed text, or holds a
/// control character (hyperjob never writes one), makes the whole record not hyperjob's.
pub fn parse_metadata(xml: &str) -> Option<MetadataRecord> {
    let owner = match element_text(xml, "owner") {
        None => None,
        Some(text) => Some(unescape(text).filter(|o| !o.contains(char::is_control))?),
    };
    Some(MetadataRecord {
        job_id: element_number(xml, "id")?,
        created_unix: element_number(xml, "created")?,
        deadline_unix: element_number(xml, "deadline")?,
        owner,
    })
}

fn element_number(xml: &str, name: &str) -> Option<u64> {
    element_text(xml, name)?.trim().parse().ok()
}

/// The raw text of the first element whose local name is `name` (`""` when it is empty).
fn element_text<'x>(xml: &'x str, name: &str) -> Option<&'x str> {
    let mut rest = xml;
    while let Some(open) = rest.find('<') {
        rest = &rest[open + 1..];
        let end = rest.find('>')?;
        let tag = &rest[..end];
        if tag.starts_with(['/', '?', '!']) {
            continue;
        }
        let empty = tag.ends_with('/');
        let tag_name = tag
            .trim_end_matches('/')
            .split_whitespace()
            .next()
            .unwrap_or_default();
        let local = tag_name.rsplit(':').next().unwrap_or(tag_name);
        if local == name {
            if empty {
                return Some("");
            }
            let body = &rest[end + 1..];
            let close = body.find('<')?;
            return Some(&body[..close]);
        }
    }
    None
}

/// Reverses XML escaping: the five named entities and numeric character references. `None`
/// for anything else after a `&`.
pub fn unescape(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp + 1..];
        let semi = rest.find(';')?;
        let entity = &rest[..semi];
        let c = match entity {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "apos" => '\'',
            "quot" => '"',
            _ => {
                let code = match entity.strip_prefix("#x").or(entity.strip_prefix("#X")) {
                    Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                    None => entity.strip_prefix('#')?.parse().ok()?,
                };
                char::from_u32(code)?
            }
        };
        out.push(c);
        rest = &rest[semi + 1..];
    }
    out.push_str(rest);
    Some(out)
}

pub(crate) fn escape_path(path: &Path) -> String {
    escape(&path.to_string_lossy())
}

/// Escapes text for XML element content and single- or double-quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            // XML 1.0 cannot carry other control characters at all, escaped or not.
            c if c.is_control() && !matches!(c, '\t' | '\n' | '\r') => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::machine::{Arch, Firmware};

    /// What a TCG config without `arch`, `cpu_mode` and `firmware` gets on an x86_64 host.
    static TCG_DEFAULT: Machine = Machine {
        arch: Arch::X86_64,
        cpu: None,
        firmware: Firmware::Bios,
    };

    fn spec<'a>(overlay: &'a Path, log: &'a Path, boot: Option<&'a DirectBoot>) -> DomainSpec<'a> {
        DomainSpec {
            name: "hyperjob-job-42",
            domain_type: DomainType::Qemu,
            vcpus: 2,
            memory_mib: 512,
            overlay,
            nic: Nic::plain("default"),
            direct_boot: boot,
            machine: &TCG_DEFAULT,
            nvram: Path::new("/images/hyperjob-job-42.nvram.fd"),
            console_log: log,
            seed: None,
            job_id: 42,
            created_unix: 1000,
            deadline_unix: 8200,
            owner: "/var/lib/hyperjob",
        }
    }

    #[test]
    fn a_relabelled_record_parses_back() {
        let element = metadata_for_set(7, (100, 200), "/srv/a<&>b");

        let record = parse_metadata(&element).expect("parses");

        assert_eq!(
            (record.job_id, record.created_unix, record.deadline_unix),
            (7, 100, 200)
        );
        assert_eq!(record.owner.as_deref(), Some("/srv/a<&>b"));
    }

    #[test]
    fn bootloader_image_boots_from_disk() {
        let overlay = PathBuf::from("/images/hyperjob-job-42.qcow2");
        let log = PathBuf::from("/images/hyperjob-job-42.console.log");

        let xml = domain_xml(&spec(&overlay, &log, None));

        assert!(xml.starts_with("<domain type='qemu'>\n  <name>hyperjob-job-42</name>"));
        assert!(xml.contains("<boot dev='hd'/>"));
        assert!(xml.contains("<type arch='x86_64' machine='pc'>hvm</type>"));
        assert!(!xml.contains("<kernel>"));
        assert!(xml.contains("<source file='/images/hyperjob-job-42.qcow2'/>"));
        assert!(xml.contains("<target dev='vda' bus='virtio'/>"));
        assert!(xml.contains("<source network='default'/>"));
        assert!(xml.contains("<memory unit='MiB'>512</memory>"));
        assert!(xml.contains("<vcpu>2</vcpu>"));
        assert!(xml.contains("<features><acpi/><apic/></features>"));
    }

    #[test]
    fn direct_kernel_boot_sets_kernel_initrd_and_cmdline() {
        let overlay = PathBuf::from("/o.qcow2");
        let log = PathBuf::from("/o.log");
        let boot = DirectBoot {
            kernel: PathBuf::from("/boot/vmlinuz"),
            initrd: Some(PathBuf::from("/boot/initrd.img")),
            cmdline: Some("root=/dev/vda rw console=ttyS0".to_string()),
        };

        let xml = domain_xml(&spec(&overlay, &log, Some(&boot)));

        assert!(xml.contains("<kernel>/boot/vmlinuz</kernel>"));
        assert!(xml.contains("<initrd>/boot/initrd.img</initrd>"));
        assert!(xml.contains("<cmdline>root=/dev/vda rw console=ttyS0</cmdline>"));
        assert!(!xml.contains("<boot dev='hd'/>"));
    }

    #[test]
    fn seed_is_attached_read_only_as_a_second_virtio_disk() {
        let overlay = PathBuf::from("/o.qcow2");
        let log = PathBuf::from("/o.log");
        let seed = PathBuf::from("/images/hyperjob-job-42.seed.iso");
        let mut spec = spec(&overlay, &log, None);
        spec.seed = Some(&seed);

        let xml = domain_xml(&spec);

        assert!(xml.contains("<source file='/images/hyperjob-job-42.seed.iso'/>\n      <target dev='vdb' bus='virtio'/>\n      <readonly/>"), "{xml}");
    }

    #[test]
    fn no_seed_means_one_disk() {
        let overlay = PathBuf::from("/o.qcow2");
        let log = PathBuf::from("/o.log");

        let xml = domain_xml(&spec(&overlay, &log, None));

        assert_eq!(xml.matches("<disk ").count(), 1);
    }

    #[test]
    fn metadata_records_job_creation_and_deadline() {
        let overlay = PathBuf::from("/o.qcow2");
        let log = PathBuf::from("/o.log");

        let xml = domain_xml(&spec(&overlay, &log, None));

        assert!(xml.contains(&format!("<hyperjob:job xmlns:hyperjob='{METADATA_NS}'>")));
        assert!(xml.contains("<hyperjob:id>42</hyperjob:id>"));
        assert!(xml.contains("<hyperjob:created>1000</hyperjob:created>"));
        assert!(xml.contains("<hyperjob:deadline>8200</hyperjob:deadline>"));
        assert!(xml.contains("<hyperjob:owner>/var/lib/hyperjob</hyperjob:owner>"));
    }

    #[test]
    fn hostile_values_cannot_break_out_of_the_xml() {
        let overlay = PathBuf::from("/images/a'b<c>&\"d.qcow2");
        let log = PathBuf::from("/o.log");
        let mut spec = spec(&overlay, &log, None);
        spec.nic.network = "net'/><evil/>";
        let owner = "/srv/a'b</hyperjob:owner><evil/>&\"c";
        spec.owner = owner;

        let xml = domain_xml(&spec);

        assert!(xml.contains("<source file='/images/a&apos;b&lt;c&gt;&amp;&quot;d.qcow2'/>"));
        assert!(xml.contains("<source network='net&apos;/&gt;&lt;evil/&gt;'/>"));
        assert!(xml.contains(
            "<hyperjob:owner>/srv/a&apos;b&lt;/hyperjob:owner&gt;&lt;evil/&gt;&amp;&quot;c\
             </hyperjob:owner>"
        ));
        assert!(!xml.contains("<evil/>"));
        assert_eq!(xml.matches("</hyperjob:owner>").count(), 1);
        let start = xml.find("<hyperjob:job").expect("metadata element");
        let end = xml.find("</hyperjob:job>").expect("end");
        let record = parse_metadata(&xml[start..end]).expect("ours");
        assert_eq!(record.owner.as_deref(), Some(owner));
    }

    #[test]
    fn metadata_round_trips_through_the_parser() {
        let overlay = PathBuf::from("/o.qcow2");
        let log = PathBuf::from("/o.log");
        let xml = domain_xml(&spec(&overlay, &log, None));
        let start = xml.find("<hyperjob:job").expect("metadata element");
        let end = xml.find("</hyperjob:job>").expect("end");

        let record = parse_metadata(&xml[start..end + 15]);

        assert_eq!(
            record,
            Some(MetadataRecord {
                job_id: 42,
                created_unix: 1000,
                deadline_unix: 8200,
                owner: Some("/var/lib/hyperjob".into()),
            })
        );
    }

    #[test]
    fn metadata_as_libvirt_returns_it_is_parsed() {
        let returned = "<job xmlns=\"http://hyperjob.dev/xmlns/job/1\">\n  <id>7</id>\n  <created>5</created>\n  <deadline>9</deadline>\n  <owner>/srv/h&#xE9;&amp;&#39;j&gt;</owner>\n</job>";

        assert_eq!(
            parse_metadata(returned),
            Some(MetadataRecord {
                job_id: 7,
                created_unix: 5,
                deadline_unix: 9,
                owner: Some("/srv/h\u{e9}&'j>".into()),
            })
        );
    }

    #[test]
    fn metadata_of_an_older_hyperjob_has_no_owner() {
        let returned = "<job xmlns=\"http://hyperjob.dev/xmlns/job/1\">\n  <id>7</id>\n  <created>5</created>\n  <deadline>9</deadline>\n</job>";

        assert_eq!(
            parse_metadata(returned),
            Some(MetadataRecord {
                job_id: 7,
                created_unix: 5,
                deadline_unix: 9,
                owner: None,
            })
        );
    }

    #[test]
    fn an_owner_that_is_not_clean_text_makes_the_record_not_ours() {
        for owner in ["/a&bogus;b", "/a&b", "/a&#1;b", "/a&#xD800;b", "/a\u{1}b"] {
            let xml = format!("<job><id>7</id><created>5</created><deadline>9</deadline><owner>{owner}</owner></job>");

            assert_eq!(parse_metadata(&xml), None, "{owner:?}");
        }
        assert_eq!(
            parse_metadata(
                "<job><id>7</id><created>5</created><deadline>9</deadline><owner/></job>"
            )
            .and_then(|r| r.owner),
            Some(String::new())
        );
    }

    #[test]
    fn metadata_without_a_deadline_is_not_ours() {
        assert_eq!(
            parse_metadata("<job><id>7</id><created>5</created></job>"),
            None
        );
    }

    #[test]
    fn control_characters_are_replaced() {
        assert_eq!(escape("a\u{1}b\tc"), "a\u{FFFD}b\tc");
    }
}
