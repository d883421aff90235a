//! Unit tests of [`super`]: the decisions (source, probe answer, machine, target, PATH line).

use super::*;

fn elf(class: u8, data: u8, machine: u16) -> Vec<u8> {
    let mut head = vec![0u8; 64];
    head[..4].copy_from_slice(b"\x7fELF");
    head[4] = class;
    head[5] = data;
    let bytes = if data == 2 {
        machine.to_be_bytes()
    } else {
        machine.to_le_bytes()
    };
    head[18..20].copy_from_slice(&bytes);
    head
}

#[test]
fn an_elf_file_runs_only_on_its_machine() {
    assert_eq!(check_runs_on(&elf(2, 1, 62), "x86_64"), Ok(()));
    assert_eq!(check_runs_on(&elf(2, 1, 183), "aarch64"), Ok(()));
    assert_eq!(check_runs_on(&elf(1, 1, 3), "i686"), Ok(()));
    assert_eq!(check_runs_on(&elf(2, 1, 21), "ppc64le"), Ok(()));
    assert_eq!(check_runs_on(&elf(2, 2, 21), "ppc64"), Ok(()));
    assert_eq!(check_runs_on(&elf(2, 2, 22), "s390x"), Ok(()));
    for (head, machine) in [
        (elf(2, 1, 62), "aarch64"),
        (elf(2, 1, 183), "x86_64"),
        (elf(2, 2, 21), "ppc64le"),
        (elf(2, 1, 9999), "x86_64"),
    ] {
        let why = check_runs_on(&head, machine).expect_err(machine);
        assert!(
            why.contains(&format!("a {machine} guest cannot run")),
            "{why}"
        );
    }
}

#[test]
fn a_script_runs_anywhere_and_other_files_nowhere() {
    assert_eq!(check_runs_on(b"#!/bin/sh\necho", "riscv64"), Ok(()));
    for head in [
        &b""[..],
        b"\x7fELF",
        b"MZ\x90\x00 not for linux at all......",
    ] {
        let why = check_runs_on(head, "x86_64").expect_err("not runnable");
        assert!(
            why.contains("neither an ELF executable nor a script"),
            "{why}"
        );
    }
}

#[test]
fn the_probe_answer_says_found_or_what_is_missing() {
    assert_eq!(
        parse_probe("found /usr/bin/gitlab-runner\n"),
        Ok(GuestState::Found("/usr/bin/gitlab-runner".into()))
    );
    assert_eq!(
        parse_probe("found-home /home/ci/.local/bin\n"),
        Ok(GuestState::FoundInHome("/home/ci/.local/bin".into()))
    );
    assert_eq!(
        parse_probe("machine x86_64\nhome /home/ci\n"),
        Ok(GuestState::Missing {
            machine: "x86_64".into(),
            home: Some("/home/ci".into()),
            writable: vec![],
        })
    );
    assert_eq!(
        parse_probe("machine aarch64\nhome \nwritable /usr/local/sbin\nwritable /usr/local/bin\n"),
        Ok(GuestState::Missing {
            machine: "aarch64".into(),
            home: None,
            writable: vec!["/usr/local/sbin".into(), "/usr/local/bin".into()],
        })
    );
    assert!(parse_probe("").is_err());
    assert!(parse_probe("sh: 1: uname: not found\n").is_err());
}

#[test]
fn root_gets_usr_local_bin_and_a_user_its_home_appended_to_path() {
    let root = choose_target(
        Some("/root"),
        &[
            "/usr/local/sbin".into(),
            "/usr/local/bin".into(),
            "/usr/sbin".into(),
        ],
    );
    assert_eq!(
        root,
        Some(Target {
            dir: "/usr/local/bin".into(),
            append_to_path: false
        })
    );
    let user = choose_target(Some("/home/gitlab-runner"), &[]).expect("home");
    assert_eq!(user.path(), "/home/gitlab-runner/.local/bin/gitlab-runner");
    assert!(user.append_to_path);
    let own_bin = choose_target(
        Some("/home/ci"),
        &["/opt/tools".into(), "/home/ci/bin".into()],
    );
    assert_eq!(own_bin.map(|t| t.dir), Some("/home/ci/bin".into()));
    let any = choose_target(None, &["relative".into(), "/opt/tools".into()]);
    assert_eq!(any.map(|t| t.dir), Some("/opt/tools".into()));
    assert_eq!(choose_target(None, &[]), None);
    assert_eq!(choose_target(Some("~"), &[]), None);
}

#[test]
fn the_path_prefix_appends_the_directory_in_sh_and_bash() {
    let prefix = path_prefix("/home/o'brien/.local/bin");
    for shell in ["/bin/sh", "/bin/bash"] {
        for (path, expected) in [
            ("/usr/bin:/bin", "/usr/bin:/bin:/home/o'brien/.local/bin"),
            ("", "/home/o'brien/.local/bin"),
        ] {
            let output = std::process::Command::new(shell)
                .arg("-c")
                .arg(format!("{prefix}printf %s \"$PATH\""))
                .env("PATH", path)
                .output()
                .expect("run the shell");
            assert_eq!(String::from_utf8_lossy(&output.stdout), expected, "{shell}");
        }
    }
}

#[test]
fn doctor_names_the_machine_of_runner_binary_or_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let elf_file = dir.path().join("gitlab-runner");
    std::fs::write(&elf_file, elf(2, 1, 183)).expect("write");
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a program").expect("write");

    let ok = doctor_check(&elf_file);
    assert!(ok.ok, "{ok:?}");
    assert!(
        ok.what.ends_with(
            "an ELF executable for aarch64, copied into such guests without gitlab-runner"
        ),
        "{ok:?}"
    );
    for (path, fix) in [
        (text, "is neither an ELF executable"),
        (dir.path().join("missing"), "cannot read it"),
    ] {
        let check = doctor_check(&path);
        assert!(!check.ok, "{check:?}");
        assert!(
            check.fix.as_deref().unwrap_or_default().contains(fix),
            "{check:?}"
        );
    }
}

fn fake_proc(exe: &Path) -> (tempfile::TempDir, ProcessIdentity) {
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(root.path().join("100")).expect("mkdir");
    std::os::unix::fs::symlink(exe, root.path().join("100/exe")).expect("link");
    let runner = ProcessIdentity {
        pid: 100,
        start_ticks: 5,
        boot_id: "boot".into(),
        comm: "x".into(),
    };
    (root, runner)
}

#[test]
fn the_default_is_the_runners_executable_only_when_it_is_gitlab_runner() {
    let (proc, runner) = fake_proc(Path::new("/usr/bin/gitlab-runner"));
    let (path, named) = source(None, Some(&runner), proc.path()).expect("the runner");
    assert_eq!(path, proc.path().join("100/exe"));
    assert!(named.contains("/usr/bin/gitlab-runner"), "{named}");

    let (proc, runner) = fake_proc(Path::new("/opt/gitlab-runner-linux-amd64 (deleted)"));
    assert!(source(None, Some(&runner), proc.path()).is_ok());

    let (proc, runner) = fake_proc(Path::new("/work/target/debug/deps/e2e_jobs-0a1b"));
    let why = source(None, Some(&runner), proc.path()).expect_err("no runner");
    assert!(why.contains("is not GitLab Runner"), "{why}");
    assert!(source(None, None, proc.path()).is_err());
}

#[test]
fn runner_binary_wins_over_the_calling_process() {
    let (proc, runner) = fake_proc(Path::new("/usr/bin/gitlab-runner"));
    let (path, named) = source(
        Some(Path::new("/opt/runner/gitlab-runner")),
        Some(&runner),
        proc.path(),
    )
    .expect("configured");
    assert_eq!(path, PathBuf::from("/opt/runner/gitlab-runner"));
    assert_eq!(named, "runner_binary /opt/runner/gitlab-runner");
}
