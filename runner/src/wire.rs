//! What the runner's `Connect` stream sends, and the codec that puts it on the wire.
//!
//! Most messages are built and encoded as prost messages. A run's events are not: the
//! outbox keeps each one already encoded as its entry of `AppendEventsRequest.events`
//! ([`event_entry`]), since it must keep it until the manager acknowledges it anyway, so
//! sending a batch (or resending it after a reconnect) copies those bytes instead of
//! cloning every event's strings into a message and encoding them again. The bytes on
//! the wire are those prost writes for the same `RunnerMessage` (a test checks it).

use agentrun_shared::codec::ProtoDecoder;
use agentrun_shared::proto;
use prost::Message;
use prost::bytes::BufMut;
use prost::encoding::{self, WireType};
use tonic::Status;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

/// The field numbers this module writes by hand (see `runner_service.proto`).
const RUNNER_MESSAGE_EVENTS: u32 = 4;
const APPEND_RUNNER_ID: u32 = 1;
const APPEND_RUN_ID: u32 = 2;
const APPEND_EPOCH: u32 = 3;
const APPEND_EVENTS: u32 = 4;
const EVENT_RUNNER_SEQ: u32 = 1;
const EVENT_TYPE: u32 = 2;
const EVENT_PAYLOAD_JSON: u32 = 3;

/// One message of the runner's stream.
#[derive(Debug)]
pub enum Outgoing {
    Message(proto::RunnerMessage),
    /// An `AppendEventsRequest` whose events are already encoded.
    Append(EncodedAppend),
}

impl From<proto::runner_message::Body> for Outgoing {
    fn from(body: proto::runner_message::Body) -> Self {
        Outgoing::Message(proto::RunnerMessage { body: Some(body) })
    }
}

impl From<EncodedAppend> for Outgoing {
    fn from(append: EncodedAppend) -> Self {
        Outgoing::Append(append)
    }
}

/// A batch of one run's events, as `AppendEventsRequest` carries them.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedAppend {
    pub runner_id: String,
    pub run_id: String,
    pub epoch: i64,
    pub events: EncodedEvents,
}

/// Events one after another, each an entry of `AppendEventsRequest.events` (see
/// [`event_entry`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EncodedEvents {
    bytes: Vec<u8>,
    count: usize,
}

impl EncodedEvents {
    pub fn push(&mut self, entry: &[u8]) {
        self.bytes.extend_from_slice(entry);
        self.count += 1;
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The events as messages, for tests to look inside.
    #[cfg(test)]
    pub fn decode(&self) -> Vec<proto::RunnerEvent> {
        proto::AppendEventsRequest::decode(self.bytes.as_slice())
            .expect("the outbox encodes events it can decode")
            .events
    }
}

/// The `RunnerEvent` `{runner_seq, event_type, payload_json}` as its entry of
/// `AppendEventsRequest.events`: field key, length, then the event's fields as prost
/// writes them.
pub fn event_entry(runner_seq: i64, event_type: &str, payload_json: &str) -> Vec<u8> {
    let len = event_fields_len(runner_seq, event_type, payload_json);
    let mut entry = Vec::with_capacity(len + 1 + encoding::encoded_len_varint(len as u64));
    encoding::encode_key(APPEND_EVENTS, WireType::LengthDelimited, &mut entry);
    encoding::encode_varint(len as u64, &mut entry);
    encode_int(EVENT_RUNNER_SEQ, runner_seq, &mut entry);
    encode_str(EVENT_TYPE, event_type, &mut entry);
    encode_str(EVENT_PAYLOAD_JSON, payload_json, &mut entry);
    entry
}

fn event_fields_len(runner_seq: i64, event_type: &str, payload_json: &str) -> usize {
    int_len(EVENT_RUNNER_SEQ, runner_seq)
        + str_len(EVENT_TYPE, event_type)
        + str_len(EVENT_PAYLOAD_JSON, payload_json)
}

// Fields are written as prost writes them: a field at its default (0, "") not at all.

fn int_len(tag: u32, value: i64) -> usize {
    if value == 0 {
        return 0;
    }
    encoding::int64::encoded_len(tag, &value)
}

fn encode_int(tag: u32, value: i64, buf: &mut impl BufMut) {
    if value != 0 {
        encoding::int64::encode(tag, &value, buf);
    }
}

fn str_len(tag: u32, value: &str) -> usize {
    if value.is_empty() {
        return 0;
    }
    encoding::key_len(tag) + encoding::encoded_len_varint(value.len() as u64) + value.len()
}

/// `prost::encoding::string::encode`, from a `&str`.
fn encode_str(tag: u32, value: &str, buf: &mut impl BufMut) {
    if value.is_empty() {
        return;
    }
    encoding::encode_key(tag, WireType::LengthDelimited, buf);
    encoding::encode_varint(value.len() as u64, buf);
    buf.put_slice(value.as_bytes());
}

impl EncodedAppend {
    /// Writes the `RunnerMessage` carrying this append, as prost would.
    fn encode(&self, buf: &mut impl BufMut) {
        let fields = str_len(APPEND_RUNNER_ID, &self.runner_id)
            + str_len(APPEND_RUN_ID, &self.run_id)
            + int_len(APPEND_EPOCH, self.epoch)
            + self.events.bytes.len();
        encoding::encode_key(RUNNER_MESSAGE_EVENTS, WireType::LengthDelimited, buf);
        encoding::encode_varint(fields as u64, buf);
        encode_str(APPEND_RUNNER_ID, &self.runner_id, buf);
        encode_str(APPEND_RUN_ID, &self.run_id, buf);
        encode_int(APPEND_EPOCH, self.epoch, buf);
        buf.put_slice(&self.events.bytes);
    }
}

/// The codec of the runner's `Connect` call: [`Outgoing`] out, `ManagerMessage` in
/// (decoded as every agentrun client decodes).
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnectCodec;

impl Codec for ConnectCodec {
    type Encode = Outgoing;
    type Decode = proto::ManagerMessage;
    type Encoder = ConnectEncoder;
    type Decoder = ProtoDecoder<proto::ManagerMessage>;

    fn encoder(&mut self) -> Self::Encoder {
        ConnectEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder::default()
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ConnectEncoder;

impl Encoder for ConnectEncoder {
    type Item = Outgoing;
    type Error = Status;

    fn encode(&mut self, item: Outgoing, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            Outgoing::Message(message) => message
                .encode(dst)
                .map_err(|err| Status::internal(err.to_string())),
            Outgoing::Append(append) => {
                append.encode(dst);
                Ok(())
            }
        }
    }
}

/// Opens `RunnerService.Connect` on `channel`, sending `request`'s stream.
pub async fn connect(
    channel: Channel,
    request: tonic::Request<impl tokio_stream::Stream<Item = Outgoing> + Send + 'static>,
) -> Result<tonic::Streaming<proto::ManagerMessage>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|err| Status::unavailable(format!("the manager is not ready: {err}")))?;
    let path = PathAndQuery::from_static("/agentrun.v1.RunnerService/Connect");
    let mut request = request;
    request.extensions_mut().insert(tonic::GrpcMethod::new(
        "agentrun.v1.RunnerService",
        "Connect",
    ));
    Ok(grpc
        .streaming(request, path, ConnectCodec)
        .await?
        .into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(runner_seq: i64, event_type: &str, payload_json: &str) -> proto::RunnerEvent {
        proto::RunnerEvent {
            runner_seq,
            r#type: event_type.into(),
            payload_json: payload_json.into(),
        }
    }

    #[test]
    fn an_encoded_append_is_the_message_prost_writes() {
        let long = format!("{{\"delta\":\"{}\"}}", "x".repeat(300));
        let events = [
            event(1, "content.delta", r#"{"delta":"hi"}"#),
            event(2, "item.completed", &long),
            event(300, "", ""),
        ];
        for (runner_id, run_id, epoch) in [("r-1", "run-1", 7), ("", "", 0)] {
            let mut encoded = EncodedEvents::default();
            for e in &events {
                encoded.push(&event_entry(e.runner_seq, &e.r#type, &e.payload_json));
            }
            assert_eq!(encoded.len(), 3);
            assert_eq!(encoded.decode(), events);
            let append = EncodedAppend {
                runner_id: runner_id.into(),
                run_id: run_id.into(),
                epoch,
                events: encoded,
            };
            let mut ours = Vec::new();
            append.encode(&mut ours);
            let prost = proto::RunnerMessage {
                body: Some(proto::runner_message::Body::Events(
                    proto::AppendEventsRequest {
                        runner_id: runner_id.into(),
                        run_id: run_id.into(),
                        epoch,
                        events: events.to_vec(),
                        command_updates: vec![],
                    },
                )),
            };
            assert_eq!(ours, prost.encode_to_vec());
        }
    }
}
