//! Chunk-size lines: `chunk_size_line` on the bytes (incremental, as for heads), then the
//! bytes as the chunked body of a response, against hyper.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sagamesh_fuzz::{CHUNKED_HEAD, Input, differential, prefixes_are_incomplete};
use sagamesh_mesh::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    if let Ok(Some((len, _size))) = fuzzing::chunk_size_line(input.bytes) {
        assert!(
            len >= 3 && input.bytes[..len].ends_with(b"\r\n"),
            "line end"
        );
    }
    prefixes_are_incomplete(input.bytes, 64, |b| {
        fuzzing::chunk_size_line(b).map(|r| r.map(|(len, _)| len))
    });
    let response = [CHUNKED_HEAD, input.bytes].concat();
    differential(&input, &response);
});
