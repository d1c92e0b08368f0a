//! Packet captures of our NVMe/TCP traffic, checked by Wireshark's dissector.
//!
//! Wireshark's NVMe/TCP dissector is an implementation of the wire format written by
//! other people; if it decodes every PDU we send without a malformed packet, an expert
//! complaint or a bad digest, our framing, padding and digests agree with theirs. The
//! capture runs `dumpcap` on the loopback interface (root or CAP_NET_RAW), and tshark
//! reads it back with the port declared as NVMe/TCP and digest checking switched on.

use std::collections::BTreeMap;
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Errors of capturing and dissecting.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// dumpcap or tshark could not be started or failed.
    #[error("{tool}: {message}")]
    Tool {
        /// The command.
        tool: String,
        /// What went wrong, with the tool's stderr.
        message: String,
    },
}

fn tool_err(tool: &str, message: impl Into<String>) -> CaptureError {
    CaptureError::Tool {
        tool: tool.to_owned(),
        message: message.into(),
    }
}

/// A running `dumpcap` on `lo`; dropping it stops the capture.
#[derive(Debug)]
pub struct Capture {
    child: Option<Child>,
    path: PathBuf,
    stderr_path: PathBuf,
    /// The filtered TCP port.
    pub port: u16,
}

impl Capture {
    /// Starts capturing TCP traffic to or from `port` on the loopback interface into
    /// `path` (pcapng) and returns once dumpcap is capturing.
    pub fn start(path: &Path, port: u16) -> Result<Self, CaptureError> {
        let _ = fs::remove_file(path);
        let stderr_path = path.with_extension("dumpcap.log");
        let stderr = fs::File::create(&stderr_path)
            .map_err(|e| tool_err("dumpcap", format!("{}: {e}", stderr_path.display())))?;
        // Probe connections go to a listener of our own, caught by the same filter: a
        // probe to the real port would reach the peer (a kernel target logs an error).
        let probe = TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| Ok((l.local_addr()?, l)))
            .map_err(|e| tool_err("probe listener", e.to_string()))?;
        let filter = format!("tcp port {port} or tcp port {}", probe.0.port());
        let child = Command::new("dumpcap")
            .args(["-i", "lo", "-f", &filter, "-B", "64", "-w"])
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| tool_err("dumpcap", format!("cannot start: {e}")))?;
        let mut capture = Self {
            child: Some(child),
            path: path.to_owned(),
            stderr_path,
            port,
        };
        // dumpcap says "Capturing on 'Loopback: lo'" a little before packets really
        // flow, so after that a probe connection is repeated until the capture file
        // grows: only then is the start of the real traffic certain to be recorded.
        let started = Instant::now();
        let mut header_len = None;
        loop {
            let log = fs::read_to_string(&capture.stderr_path).unwrap_or_default();
            let len = fs::metadata(path).map_or(0, |m| m.len());
            if log.contains("Capturing on") {
                match header_len {
                    None => header_len = Some(len),
                    Some(h) if len > h => break,
                    Some(_) => {}
                }
                let _ = TcpStream::connect_timeout(&probe.0, Duration::from_millis(200));
            }
            let exited = capture
                .child
                .as_mut()
                .map(|c| matches!(c.try_wait(), Ok(Some(_))))
                .unwrap_or(true);
            if exited || started.elapsed() > Duration::from_secs(20) {
                capture.kill();
                return Err(tool_err(
                    &format!("dumpcap -i lo -f {filter:?}"),
                    format!("did not start capturing (needs root or CAP_NET_RAW): {log}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(capture)
    }

    /// Stops the capture cleanly (SIGINT, so that dumpcap flushes) and returns the file.
    pub fn stop(mut self) -> Result<PathBuf, CaptureError> {
        // Give the last packets a moment to pass the capture filter.
        std::thread::sleep(Duration::from_millis(300));
        let Some(mut child) = self.child.take() else {
            return Ok(self.path.clone());
        };
        let interrupted = libc::pid_t::try_from(child.id()).is_ok_and(|pid| {
            // SAFETY: kill(2) has no memory effects; `pid` is our own child, which has
            // not been waited for yet, so the id cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGINT) == 0 }
        });
        if !interrupted {
            let _ = child.kill();
        }
        let status = child
            .wait()
            .map_err(|e| tool_err("dumpcap", e.to_string()))?;
        let log = fs::read_to_string(&self.stderr_path).unwrap_or_default();
        if !self.path.is_file() {
            return Err(tool_err(
                "dumpcap",
                format!("no capture file ({status}): {log}"),
            ));
        }
        // "Packets received/dropped on interface 'Loopback: lo': 120/0 (...)": report
        // drops, so that a reassembly failure they cause is not taken for our bug.
        let dropped = log
            .lines()
            .find_map(|l| l.split_once("received/dropped on interface"))
            .and_then(|(_, rest)| rest.rsplit_once("': "))
            .and_then(|(_, counts)| counts.split_whitespace().next())
            .and_then(|c| c.split_once('/'))
            .and_then(|(_, d)| d.parse::<u64>().ok());
        if dropped != Some(0) {
            eprintln!("dumpcap dropped packets or did not say: {log}");
        }
        Ok(self.path.clone())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One NVMe/TCP PDU as tshark decoded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    /// The frame that completed it.
    pub frame: u64,
    /// The PDU type (0 ICReq ... 9 R2T).
    pub pdu_type: u8,
    /// Header digest status (1 good, 2 unverified, 3 not present, 0 bad, 4 illegal).
    pub hdgst_status: Option<u8>,
    /// Data digest status, same values.
    pub ddgst_status: Option<u8>,
}

/// What tshark made of a capture.
#[derive(Debug, Clone, Default)]
pub struct Dissection {
    /// Every NVMe/TCP PDU in capture order.
    pub pdus: Vec<Pdu>,
    /// Frames tshark marked malformed, with their summary lines.
    pub malformed: Vec<String>,
    /// Expert infos of severity warning or error raised by the NVMe dissectors.
    pub nvme_expert: Vec<String>,
    /// Frames with bytes the NVMe/TCP dissector could not place (`nvme-tcp.unknown_data`).
    pub unknown_data: Vec<String>,
    /// The commands that produced this, for the failure message.
    pub commands: Vec<String>,
}

/// The name Wireshark gives each PDU type.
pub fn pdu_type_name(t: u8) -> &'static str {
    match t {
        0 => "ICReq",
        1 => "ICResp",
        2 => "H2CTermReq",
        3 => "C2HTermReq",
        4 => "CapsuleCommand",
        5 => "CapsuleResponse",
        6 => "H2CData",
        7 => "C2HData",
        9 => "R2T",
        _ => "unknown",
    }
}

impl Dissection {
    /// Number of PDUs of each type.
    pub fn counts(&self) -> BTreeMap<u8, usize> {
        let mut out = BTreeMap::new();
        for p in &self.pdus {
            *out.entry(p.pdu_type).or_insert(0) += 1;
        }
        out
    }

    /// A readable summary for assertion messages.
    pub fn summary(&self) -> String {
        let counts: Vec<String> = self
            .counts()
            .iter()
            .map(|(t, n)| format!("{}={n}", pdu_type_name(*t)))
            .collect();
        let good = |f: fn(&Pdu) -> Option<u8>| self.pdus.iter().filter(|p| f(p) == Some(1)).count();
        let checked =
            |f: fn(&Pdu) -> Option<u8>| self.pdus.iter().filter(|p| f(p).is_some()).count();
        format!(
            "commands: {}\nPDUs: {}\nheader digests good/checked: {}/{}, data digests: {}/{}\n\
             malformed: {:?}\nNVMe expert infos: {:?}\nunknown data: {:?}",
            self.commands.join(" ; "),
            counts.join(" "),
            good(|p| p.hdgst_status),
            checked(|p| p.hdgst_status),
            good(|p| p.ddgst_status),
            checked(|p| p.ddgst_status),
            self.malformed,
            self.nvme_expert,
            self.unknown_data
        )
    }
}

/// Dissects `path` with `port` declared as NVMe/TCP and both digest checks on.
pub fn dissect(path: &Path, port: u16) -> Result<Dissection, CaptureError> {
    let file = path.to_string_lossy().into_owned();
    let decode = format!("tcp.port=={port},nvme-tcp");
    let base: Vec<String> = [
        "-r",
        &file,
        "-d",
        &decode,
        "-o",
        "nvme-tcp.check_hdgst:TRUE",
        "-o",
        "nvme-tcp.check_ddgst:TRUE",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let mut out = Dissection::default();

    let mut fields = base.clone();
    fields.extend(
        [
            "-T",
            "fields",
            "-E",
            "separator=\t",
            "-E",
            "occurrence=a",
            "-E",
            "aggregator=,",
            "-e",
            "frame.number",
            "-e",
            "nvme-tcp.type",
            "-e",
            "nvme-tcp.hdgst.status",
            "-e",
            "nvme-tcp.ddgst.status",
            "-e",
            "nvme-tcp.flags.pdu.hdgst",
            "-e",
            "nvme-tcp.flags.pdu.ddgst",
            "-e",
            "nvme-tcp.plen",
        ]
        .iter()
        .map(|s| (*s).to_owned()),
    );
    let text = tshark(&fields, &mut out.commands)?;
    for line in text.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        let frame: u64 = cols
            .first()
            .and_then(|c| c.trim().parse().ok())
            .ok_or_else(|| tool_err("tshark", format!("unexpected line {line:?}")))?;
        let list = |i: usize| -> Vec<String> {
            cols.get(i)
                .map(|c| {
                    c.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        let types = list(1);
        let hflags = list(4);
        let dflags = list(5);
        let mut hstatus = list(2).into_iter();
        let mut dstatus = list(3).into_iter();
        for (i, t) in types.iter().enumerate() {
            let pdu_type = parse_num(t)
                .ok_or_else(|| tool_err("tshark", format!("frame {frame}: PDU type {t:?}")))?;
            // Status fields appear only for PDUs whose flags announce the digest, in PDU
            // order; ICReq/ICResp carry neither.
            let has = |flags: &[String]| flags.get(i).is_some_and(|f| is_true(f));
            let hdgst_status = if has(&hflags) {
                hstatus.next().and_then(|s| parse_num(&s))
            } else {
                None
            };
            let ddgst_status = if has(&dflags) {
                dstatus.next().and_then(|s| parse_num(&s))
            } else {
                None
            };
            out.pdus.push(Pdu {
                frame,
                pdu_type,
                hdgst_status,
                ddgst_status,
            });
        }
    }

    let mut malformed = base.clone();
    malformed.extend(["-Y".to_owned(), "_ws.malformed".to_owned()]);
    out.malformed = tshark(&malformed, &mut out.commands)?
        .lines()
        .map(str::to_owned)
        .collect();

    let mut unknown = base.clone();
    unknown.extend(["-Y".to_owned(), "nvme-tcp.unknown_data".to_owned()]);
    out.unknown_data = tshark(&unknown, &mut out.commands)?
        .lines()
        .map(str::to_owned)
        .collect();

    let mut expert = base;
    expert.extend(["-q".to_owned(), "-z".to_owned(), "expert,warn".to_owned()]);
    let text = tshark(&expert, &mut out.commands)?;
    // The table rows read "<frequency> <group> <protocol> <summary>".
    out.nvme_expert = text
        .lines()
        .filter(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() >= 3 && cols[0].parse::<u64>().is_ok() && cols[2].starts_with("NVMe")
        })
        .map(str::to_owned)
        .collect();
    Ok(out)
}

fn parse_num(s: &str) -> Option<u8> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(hex) => u8::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn is_true(s: &str) -> bool {
    matches!(s.trim(), "1" | "True" | "true" | "TRUE")
}

fn tshark(args: &[String], commands: &mut Vec<String>) -> Result<String, CaptureError> {
    let shown = format!("tshark {}", args.join(" "));
    commands.push(shown.clone());
    let out = Command::new("tshark")
        .args(args)
        .output()
        .map_err(|e| tool_err(&shown, format!("cannot start: {e}")))?;
    if !out.status.success() {
        return Err(tool_err(
            &shown,
            format!(
                "failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pdu_names_cover_the_spec_types() {
        assert_eq!(pdu_type_name(0), "ICReq");
        assert_eq!(pdu_type_name(9), "R2T");
        assert_eq!(pdu_type_name(8), "unknown");
    }

    #[test]
    fn numbers_parse_in_both_bases() {
        assert_eq!(parse_num("0x07"), Some(7));
        assert_eq!(parse_num("9"), Some(9));
        assert_eq!(parse_num("x"), None);
    }
}
