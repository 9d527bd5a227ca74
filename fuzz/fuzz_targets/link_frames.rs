//! Bytes from a neighbour link: the frame decoder, the message reassembler and the call
//! parser must refuse anything malformed without panicking or allocating past their limits.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use spore_shim::frame::{Assembler, FrameCodec};
use spore_shim::proto::{Answer, Call, Hello, JoinAnswer, JoinRequest};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    // The first byte picks how the input is cut into socket reads.
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut buf = BytesMut::new();
    let mut asm = Assembler::default();
    for piece in rest.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match FrameCodec.decode(&mut buf) {
                Ok(Some(f)) if f.kind.is_message() => match asm.push(f) {
                    Ok(Some(m)) => {
                        let _ = serde_json::from_slice::<Call>(&m.message.header);
                        let _ = serde_json::from_slice::<Answer>(&m.message.header);
                    }
                    Ok(None) => {}
                    Err(_) => return,
                },
                Ok(Some(f)) => {
                    if let Ok(h) = serde_json::from_slice::<Hello>(&f.payload) {
                        let _ = h.unit.validate();
                    }
                    let _ = serde_json::from_slice::<JoinRequest>(&f.payload);
                    let _ = serde_json::from_slice::<JoinAnswer>(&f.payload);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
