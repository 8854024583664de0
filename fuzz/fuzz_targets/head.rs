//! The response head: `parse_head` (incremental: every prefix of a complete head is
//! incomplete, and the answer does not change with more bytes) and `framing` / `keep_alive`
//! on what it parsed; then the whole bytes as a response, against hyper.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sagamesh_fuzz::{Input, differential, prefixes_are_incomplete};
use sagamesh_mesh::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let mut buf = BytesMut::from(input.bytes);
    if let Ok(Some(head)) = fuzzing::parse_head(&mut buf) {
        let consumed = input.bytes.len() - buf.len();
        assert_eq!(
            &input.bytes[consumed..],
            &buf[..],
            "parse_head kept the wrong rest"
        );
        let _ = fuzzing::framing(&head, input.head_method);
    }
    prefixes_are_incomplete(input.bytes, 64, |b| {
        let mut buf = BytesMut::from(b);
        fuzzing::parse_head(&mut buf).map(|h| h.map(|_| b.len() - buf.len()))
    });
    differential(&input, input.bytes);
});
