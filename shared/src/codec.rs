//! The codec of every agentrun service: prost's encoding, with one change — a message
//! that does not decode (not protobuf, or a string field that is not UTF-8) is answered
//! INVALID_ARGUMENT with prost's description of the problem, where tonic-prost answers
//! INTERNAL. The bytes came from the caller: the fault is theirs to fix, not ours to page
//! about. The generated stubs use it through `codec_path` (see `build.rs`), for unary
//! and streaming calls alike; a client decoding a response with it reports a response it
//! cannot decode the same way.
//!
//! A unary call fails with the status at once. On a request stream the handler sees it
//! as the stream's error and may just stop reading; so that such a call still ends with
//! it, a server runs each call in a [`DecodeFailure::scope`]: decoders created there
//! record their first failure, and the server's layer (the manager's `undecodable`) puts
//! it in place of an OK ending.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

/// tonic-prost's codec with [`ProtoDecoder`] decoding.
#[derive(Debug, Clone)]
pub struct ProtoCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> tonic::codec::Codec for ProtoCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProtoDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder {
            failure: CALL.try_with(DecodeFailure::clone).ok(),
            _message: PhantomData,
        }
    }
}

tokio::task_local! {
    /// The call being served, while its handler is called (see [`DecodeFailure::scope`]).
    static CALL: DecodeFailure;
}

/// The first message of one call that did not decode, as its INVALID_ARGUMENT status.
#[derive(Debug, Clone, Default)]
pub struct DecodeFailure(Arc<OnceLock<Status>>);

impl DecodeFailure {
    /// Runs `call` (a server's handling of one call) so that the decoders created in it
    /// record their failures here.
    pub fn scope<F: Future>(&self, call: F) -> impl Future<Output = F::Output> + use<F> {
        CALL.scope(self.clone(), call)
    }

    /// The status of the first message that did not decode, if one did not.
    pub fn get(&self) -> Option<&Status> {
        self.0.get()
    }
}

/// Decodes a `U`; a message that does not decode is INVALID_ARGUMENT.
#[derive(Debug, Clone, Default)]
pub struct ProtoDecoder<U> {
    /// Where a failure is recorded: the call's, when created while serving one.
    failure: Option<DecodeFailure>,
    _message: PhantomData<U>,
}

impl<U: Message + Default> Decoder for ProtoDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let decoded = decode(buf);
        if let (Err(status), Some(failure)) = (&decoded, &self.failure) {
            let _ = failure.0.set(status.clone());
        }
        decoded.map(Some)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Decodes one `U` from `buf`, or says in INVALID_ARGUMENT why it does not decode.
fn decode<U: Message + Default>(buf: impl prost::bytes::Buf) -> Result<U, Status> {
    U::decode(buf).map_err(|err| Status::invalid_argument(err.to_string()))
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::proto;

    fn request(bytes: &[u8]) -> Result<proto::CreateRunRequest, Status> {
        decode(bytes)
    }

    #[test]
    fn a_message_decodes() {
        let wanted = proto::CreateRunRequest {
            backend_profile: "scripted".into(),
            ..Default::default()
        };
        assert_eq!(request(&wanted.encode_to_vec()).unwrap(), wanted);
    }

    #[test]
    fn garbage_and_invalid_utf8_are_invalid_arguments_naming_the_problem() {
        let status = request(&[0xff; 12]).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("invalid varint"), "{status:?}");

        let mut bytes = proto::CreateRunRequest {
            backend_profile: "MARK".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let at = bytes.windows(4).position(|w| w == b"MARK").unwrap();
        bytes[at..at + 4].fill(0xff);
        let status = request(&bytes).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("backend_profile"), "{status:?}");
        assert!(status.message().contains("UTF-8"), "{status:?}");
    }
}
