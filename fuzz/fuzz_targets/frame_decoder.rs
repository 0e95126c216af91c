//! Fuzzes the serial frame decoder with arbitrary bytes cut into arbitrary reads.
//!
//! Input: two bytes choosing the maximum frame length (16 to 527) and the read sizes, then the
//! link's bytes. Whatever arrives, the decoder must not panic, must hold at most one frame's
//! bytes between reads (memory stays bounded), must only yield samples and replies that are
//! well-formed, and must leave nothing behind at end of stream. The same reads decoded the
//! device task's way (`decode_into` per read, a few items per call, then `finish_into`) must
//! yield exactly the same items. A sample's names, which a codec hands out only when they
//! change, are followed across the stream and must be those its own line spells.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use telemetryhub::device::codec::{
    Frame, FrameCodec, NameTrail, REPLY_PREFIXES, parse_line,
};
use tokio_util::codec::Encoder;
use tokio_util::codec::Decoder;

/// Checks one item of the stream `trail` follows the names of, decoded from `consumed` (the
/// bytes the call that yielded it took from the buffer).
fn check(frame: &Frame, trail: &mut NameTrail, consumed: &[u8]) {
    match frame {
        Frame::Sample(sample) => {
            // Names come with a codec's first sample, so every sample has some.
            let sample = trail
                .resolve(sample.clone())
                .expect("a sample without names before any with them");
            // And they are its own line's: the line (from the last `$` of what the call took,
            // since a line holds no other, to its line end) parsed alone says the same, which
            // also holds the unit and channel to their charsets.
            let start = consumed.iter().rposition(|&b| b == b'$').expect("a frame starts at `$`");
            let line = &consumed[start..];
            let end = line
                .iter()
                .position(|&b| b == b'\r' || b == b'\n')
                .unwrap_or(line.len());
            let alone = parse_line(&line[..end]).expect("a decoded line parses alone");
            assert_eq!(
                (alone.seq, alone.value.to_bits(), &alone.unit, &alone.channel),
                (sample.seq, sample.value.to_bits(), &sample.unit, &sample.channel),
                "{:?}",
                String::from_utf8_lossy(line)
            );
            // A decoded sample re-encodes (in the same form) to a frame that decodes to the
            // same sequence, unit and channel.
            let mut again = BytesMut::new();
            let mut codec = FrameCodec::new(16);
            codec.encode(&sample, &mut again).expect("encoding never fails");
            match FrameCodec::new(again.len().max(16)).decode(&mut again) {
                Ok(Some(Frame::Sample(back))) => {
                    let back = NameTrail::default()
                        .resolve(back)
                        .expect("a codec's first sample carries its names");
                    assert_eq!(
                        (back.seq, &back.unit, &back.channel),
                        (sample.seq, &sample.unit, &sample.channel)
                    );
                }
                // NaN and infinities print as words the parser reads back; anything else
                // would be a codec that cannot read its own output.
                other => assert!(!sample.value.is_finite(), "{sample:?} -> {other:?}"),
            }
        }
        Frame::Reply(text) => {
            assert!(!text.contains('\n'), "{text:?}");
            assert!(
                REPLY_PREFIXES
                    .iter()
                    .any(|p| text.as_bytes().starts_with(p)),
                "{text:?}"
            );
        }
        Frame::Invalid(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&[len_byte, step_byte], link)) = data.split_first_chunk::<2>() else {
        return;
    };
    let max_len = 16 + usize::from(len_byte) * 2;
    let mut codec = FrameCodec::new(max_len);
    let mut batch_codec = FrameCodec::new(max_len);
    let mut buf = BytesMut::new();
    let mut batch_buf = BytesMut::new();
    let (mut one_by_one, mut batched) = (Vec::new(), Vec::new());
    let mut trail = NameTrail::default();
    // Read sizes vary with a tiny deterministic generator, from 1 byte to 256.
    let mut state = u32::from(step_byte) | 1;
    let mut rest = link;
    while !rest.is_empty() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = (1 + (state >> 16) as usize % 256).min(rest.len());
        buf.extend_from_slice(&rest[..n]);
        batch_buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            let before = buf.clone();
            let Some(frame) = codec.decode(&mut buf).expect("the decoder never fails") else {
                break;
            };
            check(&frame, &mut trail, &before[..before.len() - buf.len()]);
            one_by_one.push(frame);
        }
        assert!(
            buf.len() <= max_len,
            "holding {} bytes with max_len {max_len}",
            buf.len()
        );
        let max = 1 + (state >> 8) as usize % 8;
        loop {
            let before = batched.len();
            batch_codec.decode_into(&mut batch_buf, &mut batched, before + max);
            if batched.len() < before + max {
                break;
            }
        }
        assert_eq!(batch_buf, buf, "both ways leave the same bytes for the next read");
    }
    loop {
        let before = buf.clone();
        let Some(frame) = codec.decode_eof(&mut buf).expect("the decoder never fails") else {
            break;
        };
        check(&frame, &mut trail, &before[..before.len() - buf.len()]);
        one_by_one.push(frame);
    }
    assert!(buf.is_empty(), "bytes left at end of stream: {buf:?}");
    batch_codec.finish_into(&mut batch_buf, &mut batched);
    assert!(batch_buf.is_empty());
    // Compared as printed: a NaN value is not equal to itself, and `{:?}` prints every f64
    // exactly.
    assert_eq!(
        format!("{batched:?}"),
        format!("{one_by_one:?}"),
        "decode_into yields what decode yields"
    );
});
