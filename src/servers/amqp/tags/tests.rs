use super::*;

fn frame(performative: &[u8], payload: &[u8], frame_type: u8) -> Vec<u8> {
    let size = 8 + performative.len() + payload.len();
    let mut f = (size as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&[2, frame_type, 0, 3]);
    f.extend_from_slice(performative);
    f.extend_from_slice(payload);
    f
}

fn transfer(tag: Option<Vec<u8>>) -> Vec<u8> {
    let t = Transfer {
        handle: fe2o3_amqp::types::definitions::Handle(7),
        delivery_id: Some(42),
        delivery_tag: tag.map(DeliveryTag::from),
        message_format: Some(0),
        settled: Some(false),
        more: false,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted: false,
        batchable: false,
    };
    serde_amqp::to_vec(&t).unwrap()
}

fn parse(f: &[u8]) -> (Transfer, Vec<u8>) {
    let size = u32::from_be_bytes(f[..4].try_into().unwrap()) as usize;
    assert_eq!(size, f.len());
    assert_eq!(&f[4..8], &[2, 0, 0, 3], "header fields kept");
    let body = &f[8..];
    let plen = performative_len(body).unwrap();
    (
        serde_amqp::from_slice(&body[..plen]).unwrap(),
        body[plen..].to_vec(),
    )
}

fn widen_zero(frame: &[u8], out: &mut Vec<u8>) {
    widen_transfer(frame, out, |_| [0; 8]);
}

#[test]
fn wide_tags_differ_across_connections_and_links() {
    let mut seen = std::collections::HashSet::new();
    for prefix in [random_prefix(), random_prefix()] {
        for handle in [0u32, 1] {
            let mut t: Transfer =
                serde_amqp::from_slice(&transfer(Some(vec![0, 0, 0, 0]))).unwrap();
            t.handle = fe2o3_amqp::types::definitions::Handle(handle);
            let f = frame(&serde_amqp::to_vec(&t).unwrap(), b"", 0);
            let mut out = Vec::new();
            widen_transfer(&f, &mut out, |_| prefix);
            let tag = parse(&out).0.delivery_tag.unwrap().into_vec();
            assert_eq!(tag.len(), 16);
            assert_eq!(&tag[..8], &prefix);
            assert!(seen.insert(tag), "tag repeated");
        }
    }
}

fn disposition(role: Role, settled: bool, state: Option<DeliveryState>) -> Vec<u8> {
    let d = Disposition {
        role,
        first: 5,
        last: Some(9),
        settled,
        state,
        batchable: false,
    };
    frame(&serde_amqp::to_vec(&d).unwrap(), b"", 0)
}

fn parse_disposition(f: &[u8]) -> (u16, Disposition) {
    let body = &f[8..];
    let plen = performative_len(body).unwrap();
    (channel(f), serde_amqp::from_slice(&body[..plen]).unwrap())
}

#[test]
fn an_unsettled_outcome_is_settled_and_answered_accepted_on_the_hubs_channel() {
    use fe2o3_amqp::types::messaging::{Rejected, Released};
    // The test frames are on channel 3 (the peer's); the hub's channel for it is 1.
    let channels = HashMap::from([(3, 1)]);
    for outcome in [
        DeliveryState::Accepted(Accepted {}),
        DeliveryState::Released(Released {}),
        DeliveryState::Rejected(Rejected { error: None }),
    ] {
        let f = disposition(Role::Receiver, false, Some(outcome.clone()));
        let (mut out, mut replies) = (Vec::new(), Vec::new());
        settle_disposition(&f, &mut out, &channels, &mut replies);
        let (ch, seen) = parse_disposition(&out);
        assert_eq!(ch, 3);
        assert!(seen.settled, "fe2o3 sees it settled");
        assert_eq!(seen.state, Some(outcome), "with the peer's outcome");
        assert_eq!((seen.first, seen.last), (5, Some(9)));
        let (ch, answer) = parse_disposition(&replies);
        assert_eq!(ch, 1, "the answer goes on the hub's channel");
        assert_eq!(answer.role, Role::Sender);
        assert!(answer.settled);
        assert_eq!(answer.state, Some(DeliveryState::Accepted(Accepted {})));
        assert_eq!((answer.first, answer.last), (5, Some(9)));
    }
}

#[test]
fn settled_or_non_terminal_or_sender_dispositions_pass_unanswered() {
    use fe2o3_amqp::types::messaging::Received;
    let channels = HashMap::from([(3, 1)]);
    let accepted = || Some(DeliveryState::Accepted(Accepted {}));
    let received = Some(DeliveryState::Received(Received {
        section_number: 0,
        section_offset: 0,
    }));
    for f in [
        disposition(Role::Receiver, true, accepted()),
        disposition(Role::Receiver, false, received),
        disposition(Role::Receiver, false, None),
        disposition(Role::Sender, false, accepted()),
    ] {
        let (mut out, mut replies) = (Vec::new(), Vec::new());
        settle_disposition(&f, &mut out, &channels, &mut replies);
        assert_eq!(out, f);
        assert!(replies.is_empty());
    }
    // A session the hub never began: left to fe2o3.
    let f = disposition(Role::Receiver, false, accepted());
    let (mut out, mut replies) = (Vec::new(), Vec::new());
    settle_disposition(&f, &mut out, &HashMap::new(), &mut replies);
    assert_eq!(out, f);
    assert!(replies.is_empty());
}

#[test]
fn the_hubs_begin_maps_the_peers_channel() {
    let begin = Begin {
        remote_channel: Some(3),
        next_outgoing_id: 0,
        incoming_window: 10,
        outgoing_window: 10,
        handle_max: Default::default(),
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    let mut f = frame(&serde_amqp::to_vec(&begin).unwrap(), b"", 0);
    f[6..8].copy_from_slice(&7u16.to_be_bytes());
    let mut channels = HashMap::new();
    note_begin(&f, &mut channels);
    assert_eq!(channels.get(&3), Some(&7));
}

#[test]
fn a_short_tag_grows_to_16_bytes_and_the_payload_stays() {
    let payload = b"\x00\x53\x75\xa0\x03abc".to_vec();
    let f = frame(&transfer(Some(vec![0, 0, 0, 9])), &payload, 0);
    let mut raw = f.clone();
    let mut out = Vec::new();
    process(&mut raw, &mut out, TRANSFER, widen_zero).unwrap();
    assert!(raw.is_empty());
    let (t, p) = parse(&out);
    let mut want = vec![0u8; 16];
    want[11] = 7; // the link handle
    want[15] = 9;
    assert_eq!(t.delivery_tag.unwrap().into_vec(), want);
    assert_eq!(t.delivery_id, Some(42));
    assert_eq!(p, payload);
    assert!(out.len() - f.len() <= HEADROOM as usize);
}

#[test]
fn other_units_pass_byte_for_byte_and_partial_frames_wait() {
    let header = b"AMQP\x00\x01\x00\x00".to_vec();
    let heartbeat = vec![0, 0, 0, 8, 2, 0, 0, 0];
    let sasl = frame(b"\x00\x53\x40\x45", b"", 1);
    let long_tag = frame(&transfer(Some(vec![1; 16])), b"x", 0);
    let continuation = frame(&transfer(None), b"y", 0);
    let mut stream = [header, heartbeat, sasl, long_tag, continuation].concat();
    let whole = stream.clone();
    let tail = frame(&transfer(Some(vec![5])), b"z", 0);
    stream.extend_from_slice(&tail[..10]);
    let mut out = Vec::new();
    process(&mut stream, &mut out, TRANSFER, widen_zero).unwrap();
    assert_eq!(out, whole);
    assert_eq!(stream, tail[..10].to_vec(), "the incomplete frame waits");
    stream.extend_from_slice(&tail[10..]);
    out.clear();
    process(&mut stream, &mut out, TRANSFER, widen_zero).unwrap();
    let (t, p) = parse(&out);
    assert_eq!(t.delivery_tag.unwrap().len(), 16);
    assert_eq!(p, b"z");
}

#[test]
fn the_peer_open_gets_headroom() {
    let open = Open {
        container_id: "peer".into(),
        hostname: None,
        max_frame_size: MaxFrameSize(65_536),
        channel_max: Default::default(),
        idle_time_out: None,
        outgoing_locales: None,
        incoming_locales: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    let f = frame(&serde_amqp::to_vec(&open).unwrap(), b"", 0);
    let mut raw = [b"AMQP\x00\x01\x00\x00".to_vec(), f].concat();
    let mut out = Vec::new();
    assert!(process(&mut raw, &mut out, OPEN, adjust_peer_open).unwrap());
    let body = &out[16..];
    let got: Open = serde_amqp::from_slice(&body[..performative_len(body).unwrap()]).unwrap();
    assert_eq!(got.max_frame_size.0, 65_536 - HEADROOM);
    assert_eq!(got.container_id, "peer");
    assert_eq!(got.idle_time_out, None);
}

#[test]
fn keepalives_go_out_at_half_the_peer_idle_time_out() {
    for (announced, seen) in [
        (240_000, Some(120_000)),
        (10_000, Some(5_000)),
        (1, Some(1)),
        (0, Some(0)),
    ] {
        let open = Open {
            container_id: "c-sdk".into(),
            hostname: None,
            max_frame_size: MaxFrameSize(65_536),
            channel_max: Default::default(),
            idle_time_out: Some(announced),
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let f = frame(&serde_amqp::to_vec(&open).unwrap(), b"", 0);
        let mut raw = [b"AMQP\x00\x01\x00\x00".to_vec(), f].concat();
        let mut out = Vec::new();
        assert!(process(&mut raw, &mut out, OPEN, adjust_peer_open).unwrap());
        let body = &out[16..];
        let got: Open = serde_amqp::from_slice(&body[..performative_len(body).unwrap()]).unwrap();
        assert_eq!(got.idle_time_out, seen, "announced {announced}");
    }
}

#[test]
fn a_frame_size_below_eight_is_an_error() {
    let mut raw = vec![0, 0, 0, 4, 2, 0, 0, 0];
    assert!(process(&mut raw, &mut Vec::new(), TRANSFER, widen_zero).is_err());
}

fn guard() -> (Guard, Arc<AtomicBool>, Arc<SessionFaults>) {
    let authenticated = Arc::new(AtomicBool::new(false));
    let faults = Arc::new(SessionFaults::default());
    let g = Guard::new(Limits {
        max_frame_size: 256 * 1024,
        channel_max: 3,
        max_handles_per_session: 16,
        incomplete_budget: 1 << 20,
        max_message_size: 256 * 1024,
        authenticated: authenticated.clone(),
        faults: faults.clone(),
    });
    (g, authenticated, faults)
}

fn amqp(channel: u16, p: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut f = frame(p, payload, 0);
    f[6..8].copy_from_slice(&channel.to_be_bytes());
    f
}

fn open_frame(max_frame_size: u32) -> Vec<u8> {
    let open = Open {
        container_id: "peer".into(),
        hostname: None,
        max_frame_size: MaxFrameSize(max_frame_size),
        channel_max: Default::default(),
        idle_time_out: None,
        outgoing_locales: None,
        incoming_locales: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    amqp(0, &serde_amqp::to_vec(&open).unwrap(), b"")
}

fn begin_frame(channel: u16) -> Vec<u8> {
    let begin = fe2o3_amqp::types::performatives::Begin {
        remote_channel: None,
        next_outgoing_id: 0,
        incoming_window: 10,
        outgoing_window: 10,
        handle_max: Default::default(),
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    amqp(channel, &serde_amqp::to_vec(&begin).unwrap(), b"")
}

fn attach_frame(handle: u32) -> Vec<u8> {
    let attach = Attach {
        name: format!("l{handle}"),
        handle: fe2o3_amqp::types::definitions::Handle(handle),
        role: fe2o3_amqp::types::definitions::Role::Sender,
        snd_settle_mode: Default::default(),
        rcv_settle_mode: Default::default(),
        source: None,
        target: None,
        unsettled: None,
        incomplete_unsettled: false,
        initial_delivery_count: Some(0),
        max_message_size: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    amqp(0, &serde_amqp::to_vec(&attach).unwrap(), b"")
}

fn opened() -> (Guard, Arc<AtomicBool>, Arc<SessionFaults>) {
    let (mut g, a, f) = guard();
    let mut raw = [
        b"AMQP\x00\x01\x00\x00".to_vec(),
        open_frame(65_536),
        begin_frame(0),
    ]
    .concat();
    g.inspect(&mut raw, &mut Vec::new()).unwrap();
    (g, a, f)
}

fn condition(v: Violation) -> String {
    symbol(&v.condition)
}

#[test]
fn an_oversized_frame_is_refused_on_its_header_alone() {
    let (mut g, _, _) = guard();
    let mut raw = b"AMQP\x00\x01\x00\x00".to_vec();
    raw.extend_from_slice(&[0xff, 0xff, 0xff, 0x00, 2, 0, 0, 0]);
    let mut out = Vec::new();
    let v = g.inspect(&mut raw, &mut out).unwrap_err();
    assert_eq!(condition(v), "amqp:connection:framing-error");
    assert_eq!(
        out, b"AMQP\x00\x01\x00\x00",
        "the header went on, the frame did not"
    );

    let (mut g, _, _) = guard();
    let mut raw = b"AMQP\x03\x01\x00\x00".to_vec();
    raw.extend_from_slice(&[0, 0, 0x40, 0x01, 2, 1, 0, 0]);
    assert!(
        g.inspect(&mut raw, &mut Vec::new()).is_err(),
        "SASL frames are capped lower"
    );
}

#[test]
fn an_open_below_512_and_a_begin_above_channel_max_are_refused() {
    let (mut g, _, _) = guard();
    let mut raw = [b"AMQP\x00\x01\x00\x00".to_vec(), open_frame(511)].concat();
    let v = g.inspect(&mut raw, &mut Vec::new()).unwrap_err();
    assert_eq!(condition(v), "amqp:invalid-field");

    let (mut g, _, _) = opened();
    let v = g.inspect(&mut begin_frame(4), &mut Vec::new()).unwrap_err();
    assert_eq!(condition(v), "amqp:connection:framing-error");
}

#[test]
fn the_farewell_is_header_open_and_close_when_the_hub_sent_nothing_yet() {
    let (mut g, _, _) = guard();
    let mut raw = b"AMQP\x00\x01\x00\x00".to_vec();
    raw.extend_from_slice(&amqp(0, b"\x00\x53\x10\xff", b""));
    let v = g.inspect(&mut raw, &mut Vec::new()).unwrap_err();
    assert_eq!(condition(v.clone()), "amqp:decode-error");
    let bye = g.farewell(&v, false, false);
    assert!(bye.starts_with(b"AMQP\x00\x01\x00\x00"));
    let (header, open) = scan_outgoing(&bye);
    assert!(header && open);
    assert!(g.farewell(&v, true, true).len() < bye.len());
}

#[test]
fn before_authentication_links_and_unfinished_bytes_are_capped() {
    let (mut g, _, _) = opened();
    for h in 0..PRE_AUTH_LINKS as u32 {
        g.inspect(&mut attach_frame(h), &mut Vec::new()).unwrap();
    }
    let err = g
        .inspect(&mut attach_frame(99), &mut Vec::new())
        .unwrap_err();
    assert_eq!(condition(err), "amqp:resource-limit-exceeded");

    let (mut g, authenticated, _) = opened();
    for h in 0..3 {
        g.inspect(&mut attach_frame(h), &mut Vec::new()).unwrap();
    }
    let part = |handle, more| {
        let mut t = serde_amqp::from_slice::<Transfer>(&transfer(Some(vec![1]))).unwrap();
        t.handle = fe2o3_amqp::types::definitions::Handle(handle);
        t.more = more;
        amqp(0, &serde_amqp::to_vec(&t).unwrap(), &[0u8; 32 * 1024])
    };
    for _ in 0..2 {
        g.inspect(&mut part(0, true), &mut Vec::new()).unwrap();
    }
    // The last frame of a delivery frees its bytes.
    g.inspect(&mut part(0, false), &mut Vec::new()).unwrap();
    assert_eq!(g.incomplete, 0);
    // One link's unfinished delivery is capped at the $cbs message size.
    for _ in 0..2 {
        g.inspect(&mut part(0, true), &mut Vec::new()).unwrap();
    }
    let err = g.inspect(&mut part(0, true), &mut Vec::new()).unwrap_err();
    assert_eq!(condition(err), "amqp:link:message-size-exceeded");

    // All links together, at the connection's budget.
    let (mut g, _, _) = opened();
    for h in 0..3 {
        g.inspect(&mut attach_frame(h), &mut Vec::new()).unwrap();
    }
    for h in 0..2 {
        for _ in 0..2 {
            g.inspect(&mut part(h, true), &mut Vec::new()).unwrap();
        }
    }
    let err = g.inspect(&mut part(2, true), &mut Vec::new()).unwrap_err();
    assert_eq!(condition(err), "amqp:resource-limit-exceeded");

    // Authenticated: the connection's own budget and the max-message-size apply.
    let (mut g, _, _) = opened();
    g.inspect(&mut attach_frame(0), &mut Vec::new()).unwrap();
    authenticated.store(true, Ordering::Relaxed);
    let mut g2 = g;
    g2.limits.authenticated = authenticated.clone();
    for _ in 0..8 {
        g2.inspect(&mut part(0, true), &mut Vec::new()).unwrap();
    }
    let err = g2.inspect(&mut part(0, true), &mut Vec::new()).unwrap_err();
    assert_eq!(condition(err), "amqp:link:message-size-exceeded");
}

#[test]
fn symbolic_descriptors_are_understood() {
    let (mut g, _, _) = guard();
    let mut open = serde_amqp::to_vec(&Open {
        container_id: "peer".into(),
        hostname: None,
        max_frame_size: MaxFrameSize(100),
        channel_max: Default::default(),
        idle_time_out: None,
        outgoing_locales: None,
        incoming_locales: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    })
    .unwrap();
    // 0x00 0x53 0x10 → 0x00 0xa3 14 "amqp:open:list"
    let mut symbolic = vec![0x00, 0xa3, 14];
    symbolic.extend_from_slice(b"amqp:open:list");
    symbolic.extend_from_slice(&open.split_off(3));
    let mut raw = [b"AMQP\x00\x01\x00\x00".to_vec(), amqp(0, &symbolic, b"")].concat();
    let v = g.inspect(&mut raw, &mut Vec::new()).unwrap_err();
    assert_eq!(
        condition(v),
        "amqp:invalid-field",
        "decoded, and its max-frame-size checked"
    );
}

#[test]
fn a_transfer_on_a_handle_never_attached_faults_its_session_and_goes_no_further() {
    let (mut g, _, faults) = opened();
    let signal = faults.signal(0);
    let t = amqp(0, &transfer(Some(vec![1])), b"x");
    let mut out = Vec::new();
    g.inspect(&mut t.clone(), &mut out).unwrap();
    assert!(out.is_empty());
    assert!(signal.is_cancelled());
}
