//! A job's output on the owner's or the consumer's terminal. The job is a stranger's program: its
//! escape sequences could write the clipboard (OSC 52), retitle the window (OSC 0), move the
//! cursor over what was printed before, or worse on some terminals. When the output goes to a
//! terminal, every control character but newline, tab and carriage return is shown instead of
//! sent (`ESC` as `^[`, a C1 control as `\u{9b}`). `--raw` sends the bytes as they are; output to a
//! file or a pipe is never changed.

use std::borrow::Cow;
use std::io::IsTerminal;

use hearth_api::jobs::Stream;

/// Whether each stream's text is made safe before it is printed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Terminal {
    stdout: bool,
    stderr: bool,
}

impl Terminal {
    /// Made safe where the stream is a terminal, unless `raw`.
    pub(crate) fn detect(raw: bool) -> Self {
        Self {
            stdout: !raw && std::io::stdout().is_terminal(),
            stderr: !raw && std::io::stderr().is_terminal(),
        }
    }

    /// Whether what goes to `stream` is made safe.
    pub(crate) fn changes(self, stream: Stream) -> bool {
        match stream {
            Stream::Stdout => self.stdout,
            Stream::Stderr => self.stderr,
        }
    }

    /// `text` as it may go to `stream`.
    pub(crate) fn show(self, stream: Stream, text: &str) -> Cow<'_, str> {
        if self.changes(stream) { shown(text) } else { Cow::Borrowed(text) }
    }
}

/// `text` with every control character but `\n`, `\t` and `\r` written out visibly.
pub(crate) fn shown(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_hidden) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if !is_hidden(c) {
            out.push(c);
        } else if let Some(caret) = caret(c) {
            out.push('^');
            out.push(caret);
        } else {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        }
    }
    Cow::Owned(out)
}

/// Whether `c` would act on the terminal rather than be printed.
fn is_hidden(c: char) -> bool {
    c.is_control() && !matches!(c, '\n' | '\t' | '\r')
}

/// The caret notation of a C0 control or DEL (`^[` for ESC, `^?` for DEL).
fn caret(c: char) -> Option<char> {
    match u32::from(c) {
        code @ 0..0x20 => char::from_u32(code + 0x40),
        0x7f => Some('?'),
        _ => None,
    }
}

/// Bytes of a job's output as text, for a byte stream cut anywhere: a UTF-8 sequence split
/// between two reads is held until it is whole, and bytes that are not UTF-8 become U+FFFD.
#[derive(Debug, Default)]
pub(crate) struct Decoder {
    carry: Vec<u8>,
}

impl Decoder {
    /// The text of `bytes` after whatever an earlier call held back.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> String {
        self.carry.extend_from_slice(bytes);
        let whole = match std::str::from_utf8(&self.carry) {
            Ok(_) => self.carry.len(),
            // A sequence cut at the end (no `error_len`) waits for the rest; anything else is
            // decoded now, replaced where it is not UTF-8.
            Err(error) if error.error_len().is_none() => error.valid_up_to(),
            Err(_) => self.carry.len(),
        };
        let text = String::from_utf8_lossy(&self.carry[..whole]).into_owned();
        self.carry.drain(..whole);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_are_shown_not_sent() {
        // OSC 52 (clipboard), OSC 0 (title), CSI (clear screen), a bell, C1 CSI.
        let attack = "a\x1b]52;c;ZXZpbA==\x07b\x1b]0;owned\x07c\x1b[2Jd\u{9b}31me\n";
        let safe = shown(attack);
        assert!(!safe.contains('\x1b') && !safe.contains('\x07') && !safe.contains('\u{9b}'), "{safe:?}");
        assert_eq!(safe, "a^[]52;c;ZXZpbA==^Gb^[]0;owned^Gc^[[2Jd\\u{9b}31me\n");
        assert!(matches!(shown("plain\ttext\r\n"), Cow::Borrowed(_)), "ordinary text is left alone");
        assert_eq!(shown("\x7f\x08"), "^?^H");
    }

    #[test]
    fn a_raw_terminal_and_a_pipe_get_the_bytes() {
        let raw = Terminal { stdout: false, stderr: false };
        assert_eq!(raw.show(Stream::Stdout, "\x1b[2J"), "\x1b[2J");
        let safe = Terminal { stdout: true, stderr: false };
        assert_eq!(safe.show(Stream::Stdout, "\x1b[2J"), "^[[2J");
        assert_eq!(safe.show(Stream::Stderr, "\x1b[2J"), "\x1b[2J");
    }

    #[test]
    fn the_decoder_joins_a_character_cut_between_reads() {
        let mut decoder = Decoder::default();
        let bytes = "é€\u{9b}".as_bytes();
        let mut text = String::new();
        for byte in bytes {
            text.push_str(&decoder.push(&[*byte]));
        }
        assert_eq!(text, "é€\u{9b}");
        assert_eq!(decoder.push(b"\xff!"), "\u{fffd}!");
    }
}
