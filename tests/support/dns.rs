//! A DNS server for tests on a real UDP socket on 127.0.0.1 (RFC 1035 messages, encoded and
//! decoded by hickory-proto): answers A queries for the names it was given, NXDOMAIN for any
//! other, and counts the queries. The bot's private-address check is pointed at it with
//! `SM_EGRESS_DNS_SERVERS`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

pub struct FakeDns {
    addr: SocketAddr,
    queries: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl FakeDns {
    /// Serves `names` (lowercase, without the final dot) → IPv4 addresses.
    pub async fn start(names: &[(&str, Ipv4Addr)]) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
        let addr = socket.local_addr().expect("addr");
        let table: HashMap<String, Ipv4Addr> = names
            .iter()
            .map(|(n, ip)| (format!("{}.", n.to_ascii_lowercase()), *ip))
            .collect();
        let queries = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&queries);
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut answer = Message::new();
                answer
                    .set_id(query.id())
                    .set_message_type(MessageType::Response)
                    .set_op_code(query.op_code())
                    .set_recursion_desired(query.recursion_desired())
                    .set_recursion_available(true)
                    .set_authoritative(true);
                let mut known = false;
                for q in query.queries() {
                    answer.add_query(q.clone());
                    let name = q.name().to_ascii().to_ascii_lowercase();
                    seen.lock().expect("lock").push(name.clone());
                    if let Some(ip) = table.get(&name) {
                        known = true;
                        if q.query_type() == RecordType::A {
                            answer.add_answer(Record::from_rdata(
                                q.name().clone(),
                                60,
                                RData::A(A(*ip)),
                            ));
                        }
                    }
                }
                if !known {
                    answer.set_response_code(ResponseCode::NXDomain);
                }
                if let Ok(bytes) = answer.to_vec() {
                    let _ = socket.send_to(&bytes, from).await;
                }
            }
        });
        Self {
            addr,
            queries,
            task,
        }
    }

    /// `127.0.0.1:<port>`, for `SM_EGRESS_DNS_SERVERS`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The names asked for so far (with their final dot).
    pub fn queries(&self) -> Vec<String> {
        self.queries.lock().expect("lock").clone()
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}
