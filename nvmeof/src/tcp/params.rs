//! Per-connection parameters fixed by the ICReq/ICResp exchange.

use super::pdu::{IcReq, IcResp, PduType};

/// Which end of the connection this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The host (initiator): sends H2C PDUs, receives C2H PDUs.
    Host,
    /// The controller (target): sends C2H PDUs, receives H2C PDUs.
    Controller,
}

/// Direction a PDU type travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Host to controller.
    HostToController,
    /// Controller to host.
    ControllerToHost,
}

/// What both ends agreed on, plus this end's own receive limit.
///
/// Before initialization ([`ConnectionParams::initial`]) no digests apply and
/// only the 128-byte ICReq/ICResp fit; after it, digests apply to every PDU
/// except the initialization and termination PDUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionParams {
    /// This end's role.
    pub role: Role,
    /// Header digest enabled.
    pub hdgst: bool,
    /// Data digest enabled.
    pub ddgst: bool,
    /// Controller PDU data alignment (0's based, units of 4 bytes) the
    /// controller requires for data in H2C PDUs.
    pub cpda: u8,
    /// Host PDU data alignment the host requires for data in C2H PDUs.
    pub hpda: u8,
    /// Largest H2CData payload the controller accepts.
    pub maxh2cdata: u32,
    /// Largest data payload this end accepts in any one received PDU: checked
    /// against PLEN before anything is allocated.
    pub max_rx_data: u32,
}

impl ConnectionParams {
    /// Parameters before ICReq/ICResp: no digests, no data.
    pub fn initial(role: Role) -> Self {
        ConnectionParams {
            role,
            hdgst: false,
            ddgst: false,
            cpda: 0,
            hpda: 0,
            maxh2cdata: super::pdu::MIN_MAXH2CDATA,
            max_rx_data: 0,
        }
    }

    /// Parameters after a successful exchange. Digests are what the ICResp
    /// enabled (the host checks that they match its request separately).
    pub fn negotiated(role: Role, req: &IcReq, resp: &IcResp, max_rx_data: u32) -> Self {
        ConnectionParams {
            role,
            hdgst: resp.hdgst,
            ddgst: resp.ddgst,
            cpda: resp.cpda,
            hpda: req.hpda,
            maxh2cdata: resp.maxh2cdata,
            max_rx_data,
        }
    }

    /// Direction of the PDUs this end receives.
    pub fn rx_direction(&self) -> Direction {
        match self.role {
            Role::Host => Direction::ControllerToHost,
            Role::Controller => Direction::HostToController,
        }
    }

    /// Alignment in bytes this end requires for received PDU data.
    pub fn rx_align(&self) -> usize {
        let pda = match self.role {
            Role::Host => self.hpda,
            Role::Controller => self.cpda,
        };
        (usize::from(pda.min(31)) + 1) * 4
    }

    /// Alignment in bytes the peer requires for the PDU data this end sends.
    pub fn tx_align(&self) -> usize {
        let pda = match self.role {
            Role::Host => self.cpda,
            Role::Controller => self.hpda,
        };
        (usize::from(pda.min(31)) + 1) * 4
    }

    /// Whether the header digest applies to a PDU type.
    pub fn hdgst_for(&self, t: PduType) -> bool {
        self.hdgst && t.digests_apply()
    }

    /// Whether the data digest applies to a PDU type carrying data.
    pub fn ddgst_for(&self, t: PduType) -> bool {
        self.ddgst && t.may_carry_data()
    }
}
