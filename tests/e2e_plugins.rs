//! Plugin files through the real binary: a stage loads only the plugins its config selects, so
//! a stale, mismatched, foreign, broken or hung plugin beside them changes nothing; a selected
//! library built for another hyperjob is refused naming both sides; one file under several
//! spellings is one plugin; `config` builds the selected plugins from their tables; panics
//! become system failures; `hyperjob plugins` lists everything with the reason for each refusal.
//! The fixture libraries are workspace members (tests/plugins/*), built next to the binary by
//! `cargo build --workspace`. All but the last test need no VM; the last runs a libvirt job
//! (scripts/test.sh's environment).

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use hyperjob_test_harness::Stage;
use support::{
    fixture_library, hyperjob, libc, prepared_session, qemu_plugin_library, refused_lines,
    session_log, stderr, stdout, unique_job_id, vm_name, write_executable, write_hung_plugin,
    PluginSetup as Setup, TestEnv,
};

fn fixture(name: &str) -> PathBuf {
    fixture_library(&hyperjob(), name)
}

#[test]
fn plugins_lists_built_in_and_library_plugins_with_their_origin() {
    let panicky = fixture("panicky");
    let setup = Setup::new("libvirt", &[&panicky]);

    let output = setup.run(&["plugins"]);

    let stdout = stdout(&output);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout.starts_with("KIND"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("backend") && l.contains("libvirt") && l.ends_with("built-in")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("transport") && l.contains("ssh") && l.ends_with("built-in")),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("backend")
            && l.contains("panicky")
            && l.ends_with(&format!("library {}", panicky.display()))),
        "{stdout}"
    );
    assert!(!stdout.contains("REFUSED"), "{stdout}");
}

#[test]
fn a_selected_library_built_for_another_core_is_refused_naming_both_versions() {
    let mismatch = fixture("mismatch");
    let setup = Setup::new("mismatch", &[&mismatch]);

    let output = setup.run(&["config"]);

    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(output.stdout.is_empty());
    assert!(
        err.contains(&format!(
            "plugin library {} was built for another hyperjob: core API version: plugin {}, hyperjob {}",
            mismatch.display(),
            hyperjob_core::abi::CORE_API_VERSION + 1,
            hyperjob_core::abi::CORE_API_VERSION
        )),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

/// The issue's scenario without a VM: beside what the config selects lie a stale library (the
/// old header layout; its initialiser aborts the process if it is ever loaded), a library for
/// another core API, a library that is no plugin, a file that is no library, three executables
/// that never say hello, one whose hello contradicts its name, a misnamed one and a missing
/// file. `config` succeeds as fast as without them; `hyperjob plugins` lists each with its
/// reason, probes the hung ones in parallel, and succeeds.
#[test]
fn unselected_broken_plugins_affect_no_stage_and_plugins_lists_each_with_its_reason() {
    let setup = Setup::new("libvirt", &[]);
    let dir = setup.path("plugins.d");
    std::fs::create_dir(&dir).expect("plugin dir");
    std::fs::copy(fixture("stale"), dir.join("libstale.so")).expect("copy");
    std::fs::copy(fixture("mismatch"), dir.join("libmismatch.so")).expect("copy");
    std::os::unix::fs::symlink(libc(), dir.join("libnotaplugin.so")).expect("symlink");
    std::fs::write(dir.join("libjunk.so"), "not a library").expect("write");
    for name in [
        "hyperjob-backend-hung1",
        "hyperjob-backend-hung2",
        "hyperjob-transport-hung3",
    ] {
        write_hung_plugin(&dir, name);
    }
    write_executable(
        &dir,
        "hyperjob-backend-liar",
        r#"echo '{"hello":{"protocol":2,"kind":"backend","name":"libvirt","version":"6.6.6"}}'; read line"#,
    );
    let misnamed = write_executable(setup.dir.path(), "my-plugin", "exec sleep 600");
    let missing = setup.path("libgone.so");
    setup.write("libvirt", &[&misnamed, &missing], &[&dir], "");
    let baseline = Setup::new("libvirt", &[]);

    let started = Instant::now();
    let config = setup.run(&["config"]);
    let config_took = started.elapsed();
    let started = Instant::now();
    let clean_config = baseline.run(&["config"]);
    let clean_took = started.elapsed();
    let started = Instant::now();
    let listing = setup.run(&["plugins"]);
    let listing_took = started.elapsed();

    println!(
        "config with 10 broken plugin files beside it: {:.3} s; without: {:.3} s; \
         `hyperjob plugins` (3 hung executables): {:.2} s",
        config_took.as_secs_f64(),
        clean_took.as_secs_f64(),
        listing_took.as_secs_f64()
    );
    assert!(config.status.success(), "{}", stderr(&config));
    assert!(clean_config.status.success(), "{}", stderr(&clean_config));
    assert_eq!(stdout(&config), stdout(&clean_config));
    assert!(stderr(&config).is_empty(), "{}", stderr(&config));
    let text = stdout(&listing);
    assert!(listing.status.success(), "{}", stderr(&listing));
    let refused = refused_lines(&text);
    let expect = [
        format!("plugin library {} was built for another hyperjob: header version: plugin 1, hyperjob 2", dir.join("libstale.so").display()),
        format!("plugin library {} was built for another hyperjob: core API version: plugin {}, hyperjob {}", dir.join("libmismatch.so").display(), hyperjob_core::abi::CORE_API_VERSION + 1, hyperjob_core::abi::CORE_API_VERSION),
        format!("{} is not a hyperjob plugin: it exports no HYPERJOB_PLUGIN_HEADER", dir.join("libnotaplugin.so").display()),
        format!("cannot read plugin library {}: it is not an ELF file", dir.join("libjunk.so").display()),
        format!("executable plugin {} did not answer within 3 s", dir.join("hyperjob-backend-hung1").display()),
        format!("executable plugin {} did not answer within 3 s", dir.join("hyperjob-backend-hung2").display()),
        format!("executable plugin {} did not answer within 3 s", dir.join("hyperjob-transport-hung3").display()),
        format!("executable plugin {} says it is backend \"libvirt\", but its file name says backend \"liar\"", dir.join("hyperjob-backend-liar").display()),
        format!("executable plugin {} is not named hyperjob-backend-<name>", misnamed.display()),
        format!("cannot use plugin file {}: No such file or directory", missing.display()),
    ];
    for expected in &expect {
        assert!(
            refused
                .iter()
                .any(|line| line.starts_with(expected.as_str())),
            "missing {expected:?} in:\n{text}"
        );
    }
    assert_eq!(refused.len(), expect.len(), "{text}");
    // Three hung executables probed one after another would take 3 × 3 s.
    assert!(
        listing_took < Duration::from_secs(9),
        "the hung executables were not probed in parallel: {listing_took:?}"
    );
}

#[test]
fn one_plugin_file_under_several_spellings_is_one_plugin() {
    let panicky = fixture("panicky");
    let setup = Setup::new("panicky", &[]);
    let dir = setup.path("plugins.d");
    std::fs::create_dir(&dir).expect("plugin dir");
    std::os::unix::fs::symlink(&panicky, dir.join("libpanicky.so")).expect("symlink");
    let bin_dir = panicky.parent().expect("dir");
    let bin_dir_name = bin_dir.file_name().expect("name");
    let dotted = bin_dir
        .join("..")
        .join(bin_dir_name)
        .join(panicky.file_name().expect("name"));
    setup.write("panicky", &[&panicky, &panicky, &dotted], &[&dir], "");

    let listing = setup.run(&["plugins"]);
    let prepare = setup.run(&["prepare"]);

    let text = stdout(&listing);
    assert!(listing.status.success(), "{}", stderr(&listing));
    assert_eq!(
        text.lines().filter(|l| l.contains("panicky")).count(),
        1,
        "{text}"
    );
    assert!(!text.contains("REFUSED"), "{text}");
    // Selected, it is used (no "registered twice"): its create panics on purpose.
    let err = stderr(&prepare);
    assert_eq!(prepare.status.code(), Some(2), "{err}");
    assert!(
        err.contains("the plugin panicked while creating the VM"),
        "{err}"
    );
}

#[test]
fn two_files_providing_one_name_clash_only_when_that_name_is_selected() {
    let setup = Setup::new("libvirt", &[]);
    let first = setup.path("liba.so");
    let second = setup.path("libb.so");
    std::fs::copy(fixture("panicky"), &first).expect("copy");
    std::fs::copy(fixture("panicky"), &second).expect("copy");
    setup.write("libvirt", &[&first, &second], &[], "");
    let clash = format!(
        "backend \"panicky\" is registered twice (library {} and library {})",
        first.display(),
        second.display()
    );

    let listing = setup.run(&["plugins"]);
    let unselected = setup.run(&["config"]);
    setup.write("panicky", &[&first, &second], &[], "");
    let selected = setup.run(&["config"]);

    let text = stdout(&listing);
    assert!(listing.status.success(), "{}", stderr(&listing));
    assert_eq!(refused_lines(&text), std::slice::from_ref(&clash), "{text}");
    assert!(unselected.status.success(), "{}", stderr(&unselected));
    let err = stderr(&selected);
    assert_eq!(selected.status.code(), Some(2), "{err}");
    assert!(err.contains(&clash), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

/// `config` builds the selected backend and transport from their tables: a broken table fails
/// config_exec with one line naming the file, the table and the key. Building creates nothing
/// and needs no libvirtd (the URI points nowhere); an unselected plugin's table is not read.
#[test]
fn config_fails_on_a_broken_table_of_a_selected_plugin_naming_file_table_and_key() {
    let setup = Setup::new("libvirt", &[]);
    let config_file = setup.path("config.toml");
    type Edit = fn(String) -> String;
    let cases: [(&str, Edit, String); 4] = [
        (
            "unknown backend key",
            |c| {
                c.replace(
                    "[backends.libvirt]\n",
                    "[backends.libvirt]\ncolour = \"blue\"\n",
                )
            },
            format!(
                "config file {} [backends.libvirt]: unknown field `colour`",
                config_file.display()
            ),
        ),
        (
            "missing required backend key",
            |c| {
                c.lines()
                    .filter(|l| !l.starts_with("base_image"))
                    .collect::<Vec<_>>()
                    .join("\n")
            },
            format!(
                "config file {} [backends.libvirt]: `base_image` is required",
                config_file.display()
            ),
        ),
        (
            "unknown transport key",
            |c| c.replace("[transports.ssh]\n", "[transports.ssh]\nprot = 22\n"),
            format!(
                "config file {} [transports.ssh]: unknown field `prot`",
                config_file.display()
            ),
        ),
        (
            "missing required transport key",
            |c| {
                c.lines()
                    .filter(|l| !l.starts_with("identity_file"))
                    .collect::<Vec<_>>()
                    .join("\n")
            },
            format!(
                "config file {} [transports.ssh]: `identity_file` is required",
                config_file.display()
            ),
        ),
    ];
    let good = std::fs::read_to_string(&config_file).expect("config");

    for (what, edit, expected) in cases {
        setup.edit_config(|_| edit(good.clone()));

        let output = setup.run(&["config"]);

        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{what}: {err}");
        assert!(output.stdout.is_empty(), "{what}");
        assert!(err.contains(&expected), "{what}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{what}: {err}");
    }
    setup.edit_config(|_| format!("{good}\n[backends.qemu]\nnonsense = [1, 2]\n"));
    let unselected = setup.run(&["config"]);
    assert!(unselected.status.success(), "{}", stderr(&unselected));
    assert!(
        !setup.path("state").exists(),
        "config created the state dir"
    );
    assert!(!setup.path("base.qcow2").exists());
}

#[test]
fn panic_inside_a_plugin_is_a_system_failure_and_leaves_nothing() {
    let panicky = fixture("panicky");
    let setup = Setup::new("panicky", &[&panicky]);

    let output = setup.run(&["prepare"]);

    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "not an abort: {err}");
    assert!(
        err.contains("the plugin panicked while creating the VM: panicky backend: create is broken on purpose"),
        "{err}"
    );
    assert!(setup.state_files().is_empty(), "{:?}", setup.state_files());
}

#[test]
fn plugin_dirs_offer_every_library_and_named_executable_in_them() {
    let setup = Setup::new("libvirt", &[]);
    let dir = setup.path("plugins.d");
    std::fs::create_dir(&dir).expect("plugin dir");
    std::fs::copy(fixture("panicky"), dir.join("libpanicky.so")).expect("copy library");
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("plugins/transport-sshcli/hyperjob-transport-sshcli");
    std::fs::copy(&python, dir.join("hyperjob-transport-sshcli")).expect("copy executable");
    std::fs::write(dir.join("README.txt"), "not a plugin").expect("write");
    setup.write("libvirt", &[], &[&dir], "");

    let output = setup.run(&["plugins"]);

    let stdout = stdout(&output);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout.contains(&format!("library {}", dir.join("libpanicky.so").display())),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "executable {}",
            dir.join("hyperjob-transport-sshcli").display()
        )),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 5, "{stdout}");
}

/// The issue's scenario with a real job: a plugin directory holds the QEMU backend library,
/// a stale library from before the upgrade (whose initialiser aborts if it is ever loaded), a
/// library for another core API and an executable that never says hello. A libvirt job's
/// config, prepare, run and cleanup, and gc (during the job and after it), all work; the
/// timings are printed. `hyperjob plugins` lists the refused files with the reason and succeeds.
#[test]
fn a_libvirt_job_is_unaffected_by_stale_and_hung_plugins_beside_the_qemu_one() {
    let env = TestEnv::load();
    let ws = env.workspace("stale-plugins");
    let plugins = tempfile::tempdir_in(&ws.dir).expect("plugin dir");
    let dir = plugins.path();
    std::fs::copy(
        qemu_plugin_library(),
        dir.join("libhyperjob_backend_qemu.so"),
    )
    .expect("copy");
    std::fs::copy(
        fixture_library(&env.hyperjob, "stale"),
        dir.join("libold_backend.so"),
    )
    .expect("copy");
    std::fs::copy(
        fixture_library(&env.hyperjob, "mismatch"),
        dir.join("libmismatch.so"),
    )
    .expect("copy");
    write_hung_plugin(dir, "hyperjob-backend-hung");
    ws.write_config(&ws.default_config().replacen(
        "[backends.libvirt]",
        &format!(
            "plugin_dirs = [{:?}]\n\n[backends.libvirt]",
            dir.display().to_string()
        ),
        1,
    ));
    let id = unique_job_id();
    let job =
        support::job_without_sources(id, "group/stale-plugins", &["echo stale plugins ignored"]);
    let gc = || {
        let started = Instant::now();
        let output = Command::new(&env.hyperjob)
            .arg("--config")
            .arg(&ws.config_path)
            .arg("gc")
            .output()
            .expect("run gc");
        (output, started.elapsed())
    };

    // config, prepare, get_sources
    let session = prepared_session(&env, &ws, &job);
    let build = session
        .run_stage(&Stage::UserStep("script".into()))
        .expect("build_script")
        .expect("invoked");
    let (gc_during, gc_during_took) = gc();
    let domain_after_gc = support::domain_exists(&env.libvirt_uri, &vm_name(id));
    let cleanup = session.cleanup().expect("cleanup invoked");
    let (gc_after, gc_after_took) = gc();
    let listing = Command::new(&env.hyperjob)
        .arg("--config")
        .arg(&ws.config_path)
        .arg("plugins")
        .output()
        .expect("run plugins");

    let log = session_log(&session);
    for invocation in session.invocations() {
        println!(
            "{:<14} {:>7.3} s",
            invocation.kind.label(),
            invocation.duration.as_secs_f64()
        );
    }
    println!(
        "{:<14} {:>7.3} s (job running)\n{:<14} {:>7.3} s (after cleanup)",
        "gc",
        gc_during_took.as_secs_f64(),
        "gc",
        gc_after_took.as_secs_f64()
    );
    assert!(session.invocations().iter().all(|i| i.succeeded()), "{log}");
    assert!(build.succeeded(), "{log}");
    assert!(log.contains("stale plugins ignored"), "{log}");
    assert!(gc_during.status.success(), "{}", stderr(&gc_during));
    assert!(domain_after_gc, "gc removed the running job's VM");
    assert!(cleanup.succeeded(), "{log}");
    assert!(gc_after.status.success(), "{}", stderr(&gc_after));
    ws.assert_nothing_left(&vm_name(id));
    let text = stdout(&listing);
    assert!(listing.status.success(), "{}", stderr(&listing));
    assert!(
        text.lines().any(|l| l.starts_with("backend")
            && l.contains("qemu")
            && l.ends_with(&format!(
                "library {}",
                dir.join("libhyperjob_backend_qemu.so").display()
            ))),
        "{text}"
    );
    let refused = refused_lines(&text);
    assert!(
        refused.contains(&format!(
            "plugin library {} was built for another hyperjob: header version: plugin 1, hyperjob 2 \
             (built against an older or newer hyperjob-core, core API 4; rebuild it against this one)",
            dir.join("libold_backend.so").display()
        )),
        "{text}"
    );
    assert!(
        refused.iter().any(|l| l.starts_with(&format!(
            "executable plugin {} did not answer",
            dir.join("hyperjob-backend-hung").display()
        ))),
        "{text}"
    );
    assert_eq!(refused.len(), 3, "{text}");
}
