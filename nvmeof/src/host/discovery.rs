//! Discovery: connect to a discovery controller and read its log.
//!
//! The discovery log can change while a host reads it in pieces; the
//! generation counter in the header tells, so the page is read until two
//! reads of the header agree.

use std::net::SocketAddr;
use std::time::Duration;

use super::error::HostError;
use super::{admin_only, HostConfig};
use crate::nvme::log::DISCOVERY_RECORD_SIZE;
use crate::nvme::{AdminCommand, DiscoveryLogEntry, DiscoveryLogHeader, LogPageId, DISCOVERY_NQN};

/// Bytes read per Get Log Page command.
const CHUNK: u32 = 16 * 1024;
/// Most records this host reads.
const MAX_RECORDS: u64 = 1024;

/// Reads the discovery log of the discovery controller at `addr`.
pub async fn discover(
    addr: SocketAddr,
    hostnqn: Option<String>,
    timeout: Duration,
) -> Result<Vec<DiscoveryLogEntry>, HostError> {
    let mut config = HostConfig::new(addr, DISCOVERY_NQN);
    if let Some(h) = hostnqn {
        config.hostnqn = h;
    }
    config.keep_alive = Duration::ZERO;
    config.connect_timeout = timeout;
    config.command_timeout = timeout;
    let (admin, id) = admin_only(&config).await?;
    if id.cntrltype != 0 && id.cntrltype != crate::nvme::IdentifyController::CNTRLTYPE_DISCOVERY {
        return Err(HostError::Setup(format!(
            "{addr} is not a discovery controller (CNTRLTYPE {})",
            id.cntrltype
        )));
    }
    for _ in 0..4 {
        let header = read_log(&admin, 0, 1024).await?;
        let h =
            DiscoveryLogHeader::decode(&header).map_err(|e| HostError::Protocol(e.to_string()))?;
        let n = h.numrec.min(MAX_RECORDS);
        let total = u64::try_from(DISCOVERY_RECORD_SIZE).unwrap_or(1024) * n;
        let mut page = header.to_vec();
        let mut off = 1024u64;
        while off < 1024 + total {
            let len = u32::try_from((1024 + total - off).min(u64::from(CHUNK))).unwrap_or(CHUNK);
            page.extend_from_slice(&read_log(&admin, off, len).await?);
            off += u64::from(len);
        }
        let again = read_log(&admin, 0, 1024).await?;
        let h2 =
            DiscoveryLogHeader::decode(&again).map_err(|e| HostError::Protocol(e.to_string()))?;
        if h2.genctr == h.genctr {
            let (_, entries) = DiscoveryLogEntry::decode_page(&page)
                .map_err(|e| HostError::Protocol(e.to_string()))?;
            return Ok(entries);
        }
    }
    Err(HostError::Path(
        "discovery log kept changing while being read".into(),
    ))
}

async fn read_log(
    admin: &super::QueueHandleGuard,
    offset: u64,
    len: u32,
) -> Result<bytes::Bytes, HostError> {
    let cmd = AdminCommand::GetLogPage {
        nsid: 0,
        lid: LogPageId::DISCOVERY,
        lsp: 0,
        rae: false,
        numd: len / 4 - 1,
        offset,
    };
    Ok(admin
        .admin(cmd, len, "get log page (discovery)")
        .await?
        .data)
}
