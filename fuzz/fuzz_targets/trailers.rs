//! The trailer section after the last chunk: `parse_trailers` on the bytes (incremental, and
//! it consumes exactly what it parsed), then the bytes after a last chunk, against hyper.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sagamesh_fuzz::{CHUNKED_HEAD, Input, differential, prefixes_are_incomplete};
use sagamesh_mesh::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    prefixes_are_incomplete(input.bytes, 64, |b| {
        let mut buf = BytesMut::from(b);
        fuzzing::parse_trailers(&mut buf).map(|t| t.map(|_| b.len() - buf.len()))
    });
    let response = [CHUNKED_HEAD, b"0\r\n", input.bytes].concat();
    differential(&input, &response);
});
