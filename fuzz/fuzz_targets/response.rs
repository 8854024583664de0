//! A whole response (interim heads, final head, body in any framing, trailers) split into reads
//! at the points the input chooses: the sidecar's exchange and body state machine
//! (`poll_frame`, polled frame by frame over a transport that returns `Pending` before every
//! read) against hyper's client on the same reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sagamesh_fuzz::{Input, differential};

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    differential(&input, input.bytes);
});
