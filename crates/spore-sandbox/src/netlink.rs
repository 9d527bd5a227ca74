//! The few rtnetlink requests that give a sandbox's network namespace egress: a veth pair
//! into the daemon's bridge, an address, a default route. Sent from the daemon's process
//! over `NETLINK_ROUTE` sockets (message types from `netlink-packet-route`, the socket from
//! `netlink-sys`) instead of running `ip`: three processes per namespace cost milliseconds
//! of CPU each, and a burst of cfork starts waits for them.
//!
//! The requests inside the sandbox's namespace go through a socket opened there by a
//! short-lived thread that enters the namespace: a netlink socket stays bound to the
//! namespace it was made in, whichever thread uses it afterwards.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// A route netlink socket with its request counter.
pub(crate) struct Rtnl {
    sock: Socket,
    seq: u32,
}

impl Rtnl {
    /// A socket in the calling thread's network namespace.
    pub(crate) fn open() -> io::Result<Rtnl> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Errors come with the kernel's text where it has one.
        let _ = sock.set_ext_ack(true);
        Ok(Rtnl { sock, seq: 0 })
    }

    /// A socket in the network namespace `ns` (an open file of it).
    pub(crate) fn open_in(ns: &File) -> io::Result<Rtnl> {
        std::thread::scope(|s| {
            s.spawn(|| {
                // Only this thread enters the namespace, and it ends right after.
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                Rtnl::open()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the netlink thread panicked")))
        })
    }

    /// Sends `msg` with `flags` and an acknowledgement request; returns the answers before
    /// the acknowledgement.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.sock.send(&buf, 0)?;
        let mut answers = Vec::new();
        loop {
            let mut rx = Vec::with_capacity(64 * 1024);
            let n = self.sock.recv(&mut rx, 0)?;
            let mut at = 0;
            while at < n {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[at..n])
                    .map_err(|e| io::Error::other(format!("an unreadable netlink answer: {e}")))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                at += len.next_multiple_of(4);
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Error(e) if e.code.is_none() => return Ok(answers),
                    NetlinkPayload::Error(e) => return Err(e.to_io()),
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::InnerMessage(m) => answers.push(m),
                    _ => {}
                }
            }
        }
    }

    /// The index of the interface called `name`.
    pub(crate) fn index_of(&mut self, name: &str) -> io::Result<u32> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_owned()));
        let answers = self
            .request(RouteNetlinkMessage::GetLink(m), 0)
            .map_err(|e| io::Error::new(e.kind(), format!("finding interface {name}: {e}")))?;
        answers
            .into_iter()
            .find_map(|a| match a {
                RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
                _ => None,
            })
            .ok_or_else(|| io::Error::other(format!("no interface {name}")))
    }

    /// Makes the veth pair `host_if` (here, a port of bridge `bridge_index`) and `peer` (in
    /// the namespace `ns`).
    pub(crate) fn add_veth(
        &mut self,
        host_if: &str,
        peer: &str,
        ns: &File,
        bridge_index: u32,
    ) -> io::Result<()> {
        let mut inner = LinkMessage::default();
        inner
            .attributes
            .push(LinkAttribute::IfName(peer.to_owned()));
        inner
            .attributes
            .push(LinkAttribute::NetNsFd(ns.as_raw_fd()));
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(host_if.to_owned()));
        m.attributes.push(LinkAttribute::Controller(bridge_index));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(inner))),
        ]));
        self.request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
            .map(drop)
            .map_err(|e| io::Error::new(e.kind(), format!("adding veth {host_if}: {e}")))
    }

    /// Makes bridge port `index` isolated (it reaches only the bridge's non-isolated ports:
    /// the host's side) and not learning, and brings it up.
    pub(crate) fn isolate_port_and_up(&mut self, index: u32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(vec![
                InfoBridgePort::Isolated(true),
                InfoBridgePort::Learning(false),
            ])),
        ]));
        self.request(RouteNetlinkMessage::NewLink(m), 0)
            .map_err(|e| io::Error::new(e.kind(), format!("isolating bridge port {index}: {e}")))?;
        self.up(index)
    }

    /// Brings interface `index` up.
    pub(crate) fn up(&mut self, index: u32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(m), 0)
            .map(drop)
            .map_err(|e| io::Error::new(e.kind(), format!("bringing up interface {index}: {e}")))
    }

    /// Adds `addr/prefix` to interface `index`.
    pub(crate) fn add_address(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = prefix;
        m.header.scope = AddressScope::Universe;
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(IpAddr::V4(addr)));
        m.attributes
            .push(AddressAttribute::Address(IpAddr::V4(addr)));
        self.request(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
        .map_err(|e| io::Error::new(e.kind(), format!("adding address {addr}/{prefix}: {e}")))
    }

    /// Adds the default route via `gateway` on interface `index`.
    pub(crate) fn add_default_route(&mut self, index: u32, gateway: Ipv4Addr) -> io::Result<()> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = RouteScope::Universe;
        m.header.kind = RouteType::Unicast;
        m.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        m.attributes.push(RouteAttribute::Oif(index));
        self.request(RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_EXCL)
            .map(drop)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("adding the default route via {gateway}: {e}"),
                )
            })
    }

    /// Deletes interface `name` (and its veth peer with it).
    pub(crate) fn delete(&mut self, name: &str) -> io::Result<()> {
        let index = self.index_of(name)?;
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.request(RouteNetlinkMessage::DelLink(m), 0).map(drop)
    }
}
