use super::*;

const V2: (u64, u64) = (PROTOCOL_MIN, PROTOCOL_MAX);

fn hello(line: &str) -> Result<Hello, String> {
    parse_hello(line, V2.0, V2.1)
}

#[test]
fn a_valid_hello_is_accepted_with_its_known_capabilities() {
    let hello = hello(
        r#"{"hello":{"protocol":2,"kind":"backend","name":"ssh-cli","version":"0.1.0",
            "capabilities":["list_owned","teleport","console_tail","list_owned"]}}"#,
    )
    .expect("valid");

    assert_eq!(
        hello,
        Hello {
            protocol: 2,
            kind: Kind::Backend,
            name: "ssh-cli".into(),
            version: "0.1.0".into(),
            capabilities: vec!["list_owned".into(), "console_tail".into()],
            endpoint_kinds: vec![EndpointKind::Tcp],
        }
    );
    assert!(hello.has("console_tail") && !hello.has("halt"));
}

#[test]
fn a_hello_without_capabilities_declares_none() {
    let hello = hello(r#"{"hello":{"protocol":2,"kind":"transport","name":"x","version":"1"}}"#)
        .expect("valid");

    assert!(hello.capabilities.is_empty());
}

#[test]
fn a_version_1_plugin_is_refused_naming_both_versions() {
    let err = hello(r#"{"hello":{"protocol":1,"kind":"backend","name":"x","version":"1"}}"#)
        .expect_err("v1");

    assert_eq!(
        err,
        "speaks protocol 1, hyperjob speaks 2 (see docs/plugin-protocol.md)"
    );
    assert_eq!(
        parse_hello(
            r#"{"hello":{"protocol":5,"kind":"backend","name":"x","version":"1"}}"#,
            2,
            3
        )
        .expect_err("v5"),
        "speaks protocol 5, hyperjob speaks 2 to 3 (see docs/plugin-protocol.md)"
    );
}

#[test]
fn a_plugin_picks_the_newest_version_both_speak() {
    assert_eq!(pick_version(Some("2"), Some("2"), 2, 2), 2);
    assert_eq!(pick_version(Some("2"), Some("4"), 2, 3), 3);
    assert_eq!(pick_version(Some("1"), Some("2"), 1, 3), 2);
    // Nothing in common: the plugin's newest, which the host refuses naming both.
    assert_eq!(pick_version(Some("4"), Some("5"), 2, 3), 3);
    // Run by hand (no range stated): the version of this hyperjob-core.
    assert_eq!(pick_version(None, None, 2, 2), PROTOCOL_MAX);
}

#[test]
fn garbage_instead_of_a_hello_is_refused() {
    assert!(hello("Traceback (most recent call last):")
        .expect_err("text")
        .starts_with("hello is not JSON"));
    assert_eq!(
        hello(r#"{"id":1,"result":{}}"#).expect_err("no hello"),
        "the first message is not a hello"
    );
    assert!(
        hello(r#"{"hello":{"protocol":2,"kind":"hypervisor","name":"x","version":"1"}}"#).is_err()
    );
    assert!(
        hello(r#"{"hello":{"protocol":2,"kind":"backend","name":"a\nb","version":"1"}}"#).is_err()
    );
    assert_eq!(
        hello(r#"{"hello":{"protocol":2,"kind":"backend","name":"a","version":"1","capabilities":"halt"}}"#)
            .expect_err("not a list"),
        "hello `capabilities` must be a list of strings"
    );
}

#[test]
fn results_errors_streams_and_progress_are_told_apart() {
    assert_eq!(
        parse_incoming(r#"{"id":3,"result":{"ok":true}}"#).expect("result"),
        Incoming::Result {
            id: 3,
            result: json!({"ok": true})
        }
    );
    assert_eq!(
        parse_incoming(r#"{"id":4,"stream":"stderr","data":"aGk="}"#).expect("frame"),
        Incoming::Stream {
            id: 4,
            stream: OutputStream::Stderr,
            data: b"hi".to_vec()
        }
    );
    assert_eq!(
        parse_incoming(r#"{"progress":"booting"}"#).expect("progress"),
        Incoming::Progress {
            message: "booting".into()
        }
    );
    let Incoming::Error { id, error } =
        parse_incoming(r#"{"id":5,"error":{"class":"not_found","message":"no image\nhere"}}"#)
            .expect("error")
    else {
        panic!("not an error");
    };
    assert_eq!(id, 5);
    assert!(matches!(error, PluginError::NotFound(ref m) if m == "no image here"));
}

#[test]
fn out_of_protocol_messages_are_refused_with_a_reason() {
    assert!(parse_incoming("not json")
        .expect_err("text")
        .starts_with("sent a line that is not JSON"));
    assert_eq!(
        parse_incoming(r#"{"result":{}}"#).expect_err("no id"),
        "sent a message without a numeric `id`"
    );
    assert_eq!(
        parse_incoming(r#"{"id":1,"error":{"class":"oops","message":"m"}}"#).expect_err("class"),
        "sent an error without a known `class`"
    );
    assert_eq!(
        parse_incoming(r#"{"id":1,"stream":"stdout","data":"***"}"#).expect_err("b64"),
        "sent a stream frame without base64 `data`"
    );
    assert_eq!(
        parse_incoming(r#"{"id":1}"#).expect_err("empty"),
        "sent a message that is neither result, error, stream nor progress"
    );
}

#[test]
fn large_input_goes_in_bounded_frames_that_add_up_to_it() {
    let input: Vec<u8> = (0..(2 * FRAME_BYTES + 17))
        .map(|i| (i % 251) as u8)
        .collect();

    let lines: Vec<String> = frames(9, "stdin", &input).collect();

    assert_eq!(lines.len(), 3);
    assert!(
        lines.iter().all(|l| l.len() < MAX_LINE),
        "a frame over the line cap"
    );
    let mut joined = Vec::new();
    for line in &lines {
        match parse_host_message(line).expect("frame") {
            HostMessage::Stdin { id: 9, data } => joined.extend(data),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(joined, input);
    assert_eq!(frames(9, "stdin", b"").count(), 0);
}

#[test]
fn host_messages_are_requests_cancels_or_frames() {
    assert_eq!(
        parse_host_message(r#"{"id":2,"method":"destroy","params":{"vm_name":"v"}}"#)
            .expect("request"),
        HostMessage::Request {
            id: 2,
            method: "destroy".into(),
            params: json!({"vm_name": "v"})
        }
    );
    assert_eq!(
        parse_host_message(r#"{"method":"cancel","params":{"id":7}}"#).expect("cancel"),
        HostMessage::Cancel { id: 7 }
    );
    assert!(parse_host_message(r#"{"method":"cancel"}"#).is_err());
    assert!(parse_host_message(r#"{"id":1,"stream":"stdout","data":"aGk="}"#).is_err());
}

#[test]
fn errors_keep_their_class_across_the_wire() {
    for error in [
        PluginError::Config("`x` is required".into()),
        PluginError::NotFound("no base image".into()),
        PluginError::Interrupted("while booting".into()),
        PluginError::msg("disk full"),
    ] {
        let back = error_from_json(&error_json(&error)).expect("known class");
        assert_eq!(back, error);
        assert_eq!(
            std::mem::discriminant(&back),
            std::mem::discriminant(&error)
        );
    }
    assert!(matches!(
        error_from_json(&error_json(&PluginError::Unsupported("halt"))),
        Some(PluginError::Unsupported(_))
    ));
}

#[test]
fn records_presences_and_checks_round_trip() {
    let vm = OwnedVm {
        vm_name: "hyperjob-job-1".into(),
        job_id: 1,
        created_unix: 5,
        deadline_unix: 9,
        owner: Some("/var/lib/hyperjob".into()),
    };
    assert_eq!(owned_vm(&owned_vm_json(&vm)).expect("vm"), vm);
    let without = owned_vm(&json!({"vm_name": "hyperjob-job-2", "job_id": 2,
        "created_unix": 5, "deadline_unix": 9}))
    .expect("valid without an owner");
    assert_eq!(without.owner, None);
    assert!(
        owned_vm(&json!({"vm_name": "x", "job_id": 1, "created_unix": 5,
        "deadline_unix": 9, "owner": 7}))
        .is_err()
    );
    assert!(owned_vm(&json!({"vm_name": "x", "job_id": 1, "created_unix": 5})).is_err());
    for p in [
        VmPresence::Absent,
        VmPresence::Owned(vm),
        VmPresence::Unrecognised("no metadata".into()),
    ] {
        assert_eq!(presence(&presence_json(&p)).expect("presence"), p);
    }
    let list = vec![
        Check::pass("kvm"),
        Check::fail("qemu-img", "install qemu-utils"),
    ];
    assert_eq!(checks(&checks_json(&list)).expect("checks"), list);
}

#[test]
fn a_hello_may_declare_endpoint_kinds() {
    let hello = |endpoints: &str| {
        parse_hello(
            &format!(
                r#"{{"hello":{{"protocol":2,"kind":"backend","name":"b","version":"1"{endpoints}}}}}"#
            ),
            2,
            2,
        )
    };
    assert_eq!(
        hello(r#","endpoints":["unix","tcp"]"#).map(|h| h.endpoint_kinds),
        Ok(vec![EndpointKind::Unix, EndpointKind::Tcp])
    );
    for bad in [
        r#","endpoints":[]"#,
        r#","endpoints":["udp"]"#,
        r#","endpoints":"tcp""#,
    ] {
        assert_eq!(
            hello(bad).map(|h| h.endpoint_kinds),
            Err(
                "hello `endpoints` must be a non-empty list of endpoint kinds (tcp, unix, vsock)"
                    .into()
            ),
            "{bad}"
        );
    }
}
