//! Control-protocol frames from the network: `decode_payload` of each
//! message type a peer can send (`Hello`, `ClientMsg` to the keyserver,
//! `ServerMsg` to the sidecar, a packed one unpacked), `parse_hello` (every
//! supported version's hello, as the keyserver reads it), and the
//! length-prefixed frame reader.
//! A decoded message must re-encode and decode to itself.
#![no_main]

use std::future::Future;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use meshlib::proto::{
    decode_payload, encode_frame, parse_hello, read_frame, ClientMsg, Hello, ServerMsg,
};

const MAX: usize = meshlib::proto::DEFAULT_MAX_FRAME;

fn round_trip<T>(data: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    if let Ok(msg) = decode_payload::<T>(data) {
        if let Ok(frame) = encode_frame(&msg, usize::MAX) {
            let again: T = decode_payload(&frame[4..]).expect("re-encoded message decodes");
            assert_eq!(again, msg);
        }
    }
}

/// Polls a future that never waits (its reader is a byte slice) to the end.
fn run_once<F: Future>(f: F) -> Option<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    match std::pin::pin!(f).poll(&mut cx) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<Hello>(data);
    round_trip::<ClientMsg>(data);
    round_trip::<ServerMsg>(data);
    // A hello of the current version reads the same through both paths.
    if let Ok(h) = parse_hello(data) {
        if h.version == meshlib::proto::VERSION {
            assert_eq!(decode_payload::<Hello>(data).ok(), Some(h));
        }
    }
    // The frame reader: a stream of frames as a peer would send them.
    let mut stream = data;
    for _ in 0..16 {
        match run_once(read_frame::<ClientMsg, _>(&mut stream, MAX)) {
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    let mut stream = data;
    let _ = run_once(read_frame::<ServerMsg, _>(&mut stream, MAX));
});
