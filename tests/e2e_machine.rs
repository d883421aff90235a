//! End-to-end: the guest machine (`arch`, `cpu_mode` and `firmware` of `[backends.libvirt]`) as
//! libvirt runs it and as the guest sees it. The stock guest (systemd, OpenSSH, cloud-init;
//! booted by direct kernel boot, which OVMF starts through the kernel's EFI stub) once under
//! UEFI with a named CPU model and once with the defaults; the hybrid `bootable.qcow2` booting
//! its own loader under UEFI (systemd-boot) and BIOS (SYSLINUX); bad values are refused before a
//! VM exists or when libvirt refuses them. `host-passthrough` needs KVM, which the test machines do
//! not have: its XML is unit-tested (crates/backend-libvirt/src/machine.rs).
//! Run with scripts/test.sh, which provides the namespaced test environment.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use hyperjob_test_harness::{run_job, Job, JobResult, RunnerSettings, Stage};
use support::{
    driver_errors, list_dir, session_log, unique_job_id, virsh, vm_name, TestEnv, Workspace,
};

/// The stock config with `keys` added to its `[backends.libvirt]` table.
fn stock_config_with(ws: &Workspace, keys: &str) -> String {
    let config = ws.stock_config();
    assert!(config.contains("memory_mib = 512\n"), "{config}");
    config.replace("memory_mib = 512\n", &format!("memory_mib = 512\n{keys}"))
}

/// Script lines that print how the guest booted, its CPU and its architecture.
const MACHINE_CHECKS: &[&str] = &[
    "if [ -d /sys/firmware/efi ]; then echo 'booted via: efi'; else echo 'booted via: bios'; fi",
    "grep -m1 '^model name' /proc/cpuinfo | sed 's/^model name[[:space:]]*: */guest cpu: /'",
    "echo \"guest arch: $(uname -m)\"",
];

/// What one job on the stock guest showed.
struct Observed {
    log: String,
    /// libvirt's live XML of the job's domain, taken while the job ran.
    domain_xml: String,
    /// Name and mode of each file in `images_dir` while the job ran.
    files: Vec<(String, u32)>,
}

/// Runs a job on the stock guest (prepare, the machine checks, cleanup) with `config`, checks
/// that it succeeded and left nothing, and prints how long the guest took to boot to SSH.
fn stock_job(env: &TestEnv, ws: &Workspace, config: &str, figure: &str) -> Observed {
    ws.write_config(config);
    let id = unique_job_id();
    let job = support::job_without_sources(id, "group/machine", MACHINE_CHECKS);
    let session = support::prepared_session(env, ws, &job);
    let domain_xml = virsh(&env.libvirt_uri, &["dumpxml", &vm_name(id)]);
    let files = list_dir(&ws.images_dir)
        .into_iter()
        .map(|name| {
            let meta = std::fs::metadata(ws.images_dir.join(&name)).expect("stat");
            (name, meta.permissions().mode() & 0o7777)
        })
        .collect();
    let build = session
        .run_stage(&Stage::UserStep("script".into()))
        .expect("build_script")
        .expect("invoked");
    session.cleanup();

    let log = session_log(&session);
    let ready = log.lines().find(|line| line.contains("Guest ready at"));
    println!("{figure}: {}", ready.unwrap_or("no \"Guest ready\" line"));
    assert!(build.succeeded(), "{log}");
    ws.assert_nothing_left(&vm_name(id));
    Observed {
        log,
        domain_xml,
        files,
    }
}

#[test]
fn stock_guest_boots_via_uefi_with_a_named_cpu_model() {
    let env = TestEnv::load();
    let ws = env.workspace("machine-efi");
    let config = stock_config_with(&ws, "cpu_mode = \"Nehalem\"\nfirmware = \"efi\"\n");

    let seen = stock_job(&env, &ws, &config, "stock guest, UEFI (OVMF)");

    let (log, xml) = (&seen.log, &seen.domain_xml);
    assert!(
        log.contains("starting domain (qemu, x86_64 pc, UEFI, CPU Nehalem, 1 vCPU, 512 MiB)"),
        "{log}"
    );
    assert!(log.contains("booted via: efi"), "{log}");
    assert!(
        log.contains("guest cpu: Intel Core i7 9xx (Nehalem Class Core i7)"),
        "{log}"
    );
    assert!(log.contains("guest arch: x86_64"), "{log}");
    // libvirt's firmware autoselection: plain OVMF, no Secure Boot.
    assert!(xml.contains("<os firmware='efi'>"), "{xml}");
    assert!(
        xml.contains("<type arch='x86_64' machine='pc-i440fx-"),
        "{xml}"
    );
    assert!(
        xml.contains("<feature enabled='no' name='secure-boot'/>"),
        "{xml}"
    );
    assert!(
        xml.contains("type='pflash'") && xml.contains("/OVMF_CODE"),
        "{xml}"
    );
    assert!(!xml.contains("secboot") && !xml.contains(".ms.fd"), "{xml}");
    let vm = xml
        .lines()
        .find_map(|l| l.trim().strip_prefix("<name>")?.strip_suffix("</name>"))
        .expect("domain name");
    let nvram = ws.images_dir.join(format!("{vm}.nvram.fd"));
    assert!(
        xml.contains(&format!(">{}</nvram>", nvram.display())),
        "{xml}"
    );
    assert!(
        xml.contains("<cpu mode='custom' match='exact'")
            && xml.contains("<model fallback='forbid'>Nehalem</model>"),
        "{xml}"
    );
    // The variable store was the VM's own file, private, and cleanup removed it (stock_job
    // checked that images_dir is empty now).
    let nvram_name = format!("{vm}.nvram.fd");
    assert!(
        seen.files
            .iter()
            .any(|(name, mode)| *name == nvram_name && mode & 0o077 == 0),
        "{:?}",
        seen.files
    );
}

#[test]
fn stock_guest_with_the_tcg_defaults_boots_via_bios_with_qemus_cpu() {
    let env = TestEnv::load();
    let ws = env.workspace("machine-bios");
    let config = ws.stock_config();
    for key in ["cpu_mode", "firmware", "arch"] {
        assert!(!config.contains(key), "{config}");
    }

    let seen = stock_job(&env, &ws, &config, "stock guest, BIOS (SeaBIOS)");

    let (log, xml) = (&seen.log, &seen.domain_xml);
    assert!(
        log.contains("starting domain (qemu, x86_64 pc, BIOS, CPU default, 1 vCPU, 512 MiB)"),
        "{log}"
    );
    assert!(log.contains("booted via: bios"), "{log}");
    assert!(log.contains("guest cpu: QEMU Virtual CPU"), "{log}");
    assert!(log.contains("guest arch: x86_64"), "{log}");
    assert!(
        xml.contains("<type arch='x86_64' machine='pc-i440fx-"),
        "{xml}"
    );
    for efi in ["firmware='efi'", "<loader", "<nvram", "OVMF"] {
        assert!(!xml.contains(efi), "{efi}: {xml}");
    }
    assert!(!xml.contains("host-passthrough"), "{xml}");
    assert!(
        seen.files.iter().all(|(name, _)| !name.contains("nvram")),
        "{:?}",
        seen.files
    );
}

#[test]
fn hybrid_disk_boots_its_own_uefi_loader_and_its_bios_loader() {
    let env = TestEnv::load();
    let ws = env.workspace("machine-disk");
    let bootloader = ws.bootloader_config();
    assert!(!bootloader.contains("kernel ="), "{bootloader}");
    let efi = bootloader.replace(
        "memory_mib = 512\n",
        "memory_mib = 512\nfirmware = \"efi\"\n",
    );
    let mut script = MACHINE_CHECKS.to_vec();
    // The boot loader's command line (systemd-boot's entry or SYSLINUX's APPEND), not a kernel
    // hyperjob passed in.
    script.push("echo \"cmdline: $(cat /proc/cmdline)\"");

    for (config, firmware) in [(efi, "efi"), (bootloader, "bios")] {
        ws.write_config(&config);
        let id = unique_job_id();
        let job = support::job_without_sources(id, "group/machine", &script);
        let report = run_job(
            &support::hyperjob_driver(&env, &ws),
            &job,
            &RunnerSettings::default(),
        );

        let log = report.log_text();
        let ready = log.lines().find(|line| line.contains("Guest ready at"));
        println!(
            "bootable.qcow2, {firmware}: {}",
            ready.unwrap_or("no \"Guest ready\" line")
        );
        assert_eq!(report.result, JobResult::Success, "{log}");
        assert!(log.contains(&format!("booted via: {firmware}")), "{log}");
        assert!(
            log.lines()
                .any(|l| l.starts_with("cmdline: ") && l.contains("root=/dev/vda2 rw")),
            "{log}"
        );
        ws.assert_nothing_left(&vm_name(id));
    }
}

fn settings() -> RunnerSettings {
    RunnerSettings {
        preparation_retries: 1,
        preparation_retry_interval: Duration::from_millis(200),
        ..RunnerSettings::default()
    }
}

#[test]
fn bad_machine_values_fail_prepare_with_one_line_and_leave_nothing() {
    let env = TestEnv::load();
    let ws = env.workspace("machine-bad");
    let config_file = ws.config_path.display().to_string();
    for (keys, expected) in [
        // Refused by hyperjob before anything is created.
        (
            "cpu_mode = \"host-passthrough\"\n",
            format!("{config_file} [backends.libvirt]: `cpu_mode` = \"host-passthrough\" needs `domain_type` = \"kvm\""),
        ),
        (
            "firmware = \"uefi\"\n",
            format!("{config_file} [backends.libvirt]: `firmware` must be \"bios\" or \"efi\", not \"uefi\""),
        ),
        (
            "arch = \"aarch64\"\ndomain_type = \"kvm\"\n",
            format!("{config_file} [backends.libvirt]: `arch` = \"aarch64\" needs `domain_type` = \"qemu\""),
        ),
        // No UEFI firmware for i686 on the test machines (only `ovmf`, not `ovmf-ia32`):
        // libvirt's autoselection finds none; hyperjob names the package.
        (
            "arch = \"i686\"\nfirmware = \"efi\"\n",
            "(firmware = \"efi\" needs UEFI firmware for i686 without Secure Boot on the host (Debian/Ubuntu package ovmf-ia32)".to_string(),
        ),
        // A plain name that is no CPU model: libvirt refuses the domain; hyperjob says where
        // to look.
        (
            "cpu_mode = \"NoSuchCPU\"\n",
            "Unknown CPU model NoSuchCPU (check `cpu_mode`: `virsh domcapabilities` lists the CPU models this host can run)".to_string(),
        ),
    ] {
        let config = ws.default_config().replace(
            "domain_type = \"qemu\"\n",
            if keys.contains("domain_type") { "" } else { "domain_type = \"qemu\"\n" },
        );
        ws.write_config(&config.replace("memory_mib = 512\n", &format!("memory_mib = 512\n{keys}")));
        let id = unique_job_id();

        let report = run_job(
            &support::hyperjob_driver(&env, &ws),
            &Job::new(id, "group/machine", "", "", &["true"]),
            &settings(),
        );

        let log = report.log_text();
        assert!(
            matches!(report.result, JobResult::SystemFailure { .. }),
            "{keys}: {:?}\n{log}",
            report.result
        );
        let errors = driver_errors(&report);
        assert_eq!(errors.len(), 1, "{keys}: {log}");
        println!("{}", errors[0]);
        assert!(errors[0].contains(&expected), "{keys}: {errors:?}");
        assert!(!errors[0].contains('\n'));
        ws.assert_nothing_left(&vm_name(id));
    }
}
