//! A Server-Sent Events parser (the subset of the WHATWG format the log endpoint emits and
//! any conforming server may send): `event:`, `data:` (joined with newlines), `id:`,
//! comments, CRLF or LF line ends, chunks split anywhere.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Event {
    /// The `event:` field; `message` when absent.
    pub(crate) event: String,
    /// The `data:` lines joined with `\n`.
    pub(crate) data: String,
    /// The last `id:` seen on this stream so far (the Last-Event-ID to resume from).
    pub(crate) id: Option<String>,
}

/// Incremental parser: feed it bytes as they arrive, take complete events out.
#[derive(Debug, Default)]
pub(crate) struct Parser {
    /// Bytes of an incomplete line.
    pending: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
    last_id: Option<String>,
    /// A `\r` ended the previous chunk: skip a `\n` starting the next one.
    after_cr: bool,
}

/// The most bytes one line may have; a longer one is a protocol error, not a memory hazard.
const MAX_LINE: usize = 4 * 1024 * 1024;

/// A line longer than the parser accepts.
#[derive(Debug, thiserror::Error)]
#[error("an event-stream line is longer than {MAX_LINE} bytes")]
pub(crate) struct LineTooLong;

impl Parser {
    /// Parses `chunk` and returns the events it completed.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> Result<Vec<Event>, LineTooLong> {
        let mut events = Vec::new();
        let mut rest = chunk;
        if self.after_cr {
            self.after_cr = false;
            if let Some(stripped) = rest.strip_prefix(b"\n") {
                rest = stripped;
            }
        }
        while let Some(end) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
            let (line, tail) = rest.split_at(end);
            self.pending.extend_from_slice(line);
            let line = std::mem::take(&mut self.pending);
            if let Some(e) = self.line(&String::from_utf8_lossy(&line)) {
                events.push(e);
            }
            rest = match tail {
                [b'\r', b'\n', more @ ..] => more,
                [b'\r'] => {
                    self.after_cr = true;
                    &[]
                }
                [_, more @ ..] => more,
                [] => &[],
            };
        }
        self.pending.extend_from_slice(rest);
        if self.pending.len() > MAX_LINE {
            return Err(LineTooLong);
        }
        Ok(events)
    }

    fn line(&mut self, line: &str) -> Option<Event> {
        if line.is_empty() {
            let data = self.data.take();
            let event = self.event.take();
            return data.map(|data| Event {
                event: event.unwrap_or_else(|| "message".to_owned()),
                data,
                id: self.last_id.clone(),
            });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            "id" if !value.contains('\0') => self.last_id = Some(value.to_owned()),
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere_parse_the_same() {
        let stream = b": keep-alive\r\nid: 3\nevent: line\ndata: {\"seq\":3}\n\nevent: end\r\ndata: {}\r\n\r\n";
        let whole = Parser::default().feed(stream).unwrap();
        assert_eq!(
            whole,
            vec![
                Event {
                    event: "line".to_owned(),
                    data: "{\"seq\":3}".to_owned(),
                    id: Some("3".to_owned())
                },
                Event {
                    event: "end".to_owned(),
                    data: "{}".to_owned(),
                    id: Some("3".to_owned())
                },
            ]
        );
        for split in 0..stream.len() {
            let mut p = Parser::default();
            let mut got = p.feed(&stream[..split]).unwrap();
            got.extend(p.feed(&stream[split..]).unwrap());
            assert_eq!(got, whole, "split at {split}");
        }
    }

    #[test]
    fn multi_line_data_and_default_event_name() {
        let got = Parser::default()
            .feed(b"data: a\ndata: b\n\ndata\n\n")
            .unwrap();
        assert_eq!(got[0].data, "a\nb");
        assert_eq!(got[0].event, "message");
        assert_eq!(got[1].data, "");
    }

    #[test]
    fn an_endless_line_is_an_error() {
        let mut p = Parser::default();
        let chunk = vec![b'x'; 1024 * 1024];
        let mut failed = false;
        for _ in 0..5 {
            if p.feed(&chunk).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
    }
}
