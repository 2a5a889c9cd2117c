//! How the ranks of a job meet before NCCL starts: rank 0 listens on MASTER_PORT, every other
//! rank connects to MASTER_ADDR:MASTER_PORT and says who it is, and once all have arrived rank 0
//! sends each the NCCL unique id (128 bytes) it created. Everything has a deadline, and every
//! failure is one line naming the address, the ranks and what to check.

use super::world::World;
use anyhow::{bail, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The NCCL unique id's size.
pub const ID_BYTES: usize = 128;

const MAGIC: &[u8; 8] = b"FINCHRDV";
const VERSION: u32 = 1;

/// A rank's greeting: magic, version, rank, world size.
fn hello(rank: usize, size: usize) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(rank as u32).to_le_bytes());
    b[16..20].copy_from_slice(&(size as u32).to_le_bytes());
    b
}

fn read_hello(b: &[u8; 20]) -> Option<(usize, usize)> {
    let word = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as usize;
    (&b[..8] == MAGIC && word(8) == VERSION as usize).then(|| (word(12), word(16)))
}

/// Rank 0 passes the id it created and gets it back; every other rank passes None and gets
/// rank 0's. A single process returns `id` (or zeros) at once.
pub fn exchange_id(world: &World, id: Option<[u8; ID_BYTES]>, timeout: Duration) -> Result<[u8; ID_BYTES]> {
    let Some((host, port)) = &world.master else { return Ok(id.unwrap_or([0; ID_BYTES])) };
    match world.rank {
        0 => serve(world, id.expect("rank 0 creates the id"), *port, timeout),
        _ => fetch(world, host, *port, timeout),
    }
}

/// Rank 0: waits until every other rank has said hello, then sends each the id.
fn serve(world: &World, id: [u8; ID_BYTES], port: u16, timeout: Duration) -> Result<[u8; ID_BYTES]> {
    let who = world.describe();
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
        anyhow::anyhow!("{who}: cannot listen on port {port} (MASTER_PORT): {e}; pick a free MASTER_PORT")
    })?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let mut arrived: Vec<Option<TcpStream>> = (0..world.size).map(|_| None).collect();
    let mut waiting = world.size - 1;
    while waiting > 0 {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut b = [0u8; 20];
                // A stray connection (a port scanner, a health check) is ignored.
                let Some((rank, size)) = stream.read_exact(&mut b).ok().and_then(|_| read_hello(&b)) else { continue };
                if size != world.size {
                    bail!(
                        "{who}: the process at {peer} says it is rank {rank} of {size}: every process of the job must \
                         have the same world size"
                    );
                }
                if rank == 0 || rank >= world.size || arrived[rank].is_some() {
                    bail!("{who}: two processes say they are rank {rank} (the second from {peer})");
                }
                arrived[rank] = Some(stream);
                waiting -= 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> =
                        (1..world.size).filter(|&r| arrived[r].is_none()).map(|r| r.to_string()).collect();
                    bail!(
                        "{who}: rank{} {} did not arrive at port {port} within {} s: check that every process started, \
                         and that MASTER_ADDR names this machine",
                        if missing.len() > 1 { "s" } else { "" },
                        missing.join(", "),
                        timeout.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => bail!("{who}: the rendezvous on port {port} failed: {e}"),
        }
    }
    let mut reply = Vec::with_capacity(8 + ID_BYTES);
    reply.extend_from_slice(MAGIC);
    reply.extend_from_slice(&id);
    for (rank, stream) in arrived.iter_mut().enumerate().skip(1) {
        let stream = stream.as_mut().expect("every rank arrived");
        stream.write_all(&reply).map_err(|e| anyhow::anyhow!("{who}: cannot send the NCCL id to rank {rank}: {e}"))?;
    }
    Ok(id)
}

/// Any other rank: connects (retrying until the deadline: rank 0 may start later), says hello,
/// and reads the id.
fn fetch(world: &World, host: &str, port: u16, timeout: Duration) -> Result<[u8; ID_BYTES]> {
    let who = world.describe();
    let deadline = Instant::now() + timeout;
    let place = format!("{host}:{port} (MASTER_ADDR:MASTER_PORT)");
    let unreachable = |why: String| {
        anyhow::anyhow!(
            "{who}: cannot reach rank 0 at {place} within {} s: {why}; check that rank 0 started, the address, the \
             port and the firewall",
            timeout.as_secs()
        )
    };
    let mut last = String::from("no answer");
    let mut stream = loop {
        let addrs: Vec<SocketAddr> = match (host, port).to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => {
                last = format!("cannot resolve {host}: {e}");
                Vec::new()
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if let Some(s) =
            addrs.iter().find_map(|a| match TcpStream::connect_timeout(a, left.max(Duration::from_millis(1))) {
                Ok(s) => Some(s),
                Err(e) => {
                    last = e.to_string();
                    None
                }
            })
        {
            break s;
        }
        if Instant::now() >= deadline {
            return Err(unreachable(last));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    stream.write_all(&hello(world.rank, world.size)).map_err(|e| unreachable(e.to_string()))?;
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
    stream.set_read_timeout(Some(left))?;
    let mut reply = [0u8; 8 + ID_BYTES];
    stream.read_exact(&mut reply).map_err(|e| {
        anyhow::anyhow!(
            "{who}: rank 0 at {place} did not send the NCCL id within {} s ({e}): another rank may be missing or \
             misconfigured",
            timeout.as_secs()
        )
    })?;
    if &reply[..8] != MAGIC {
        bail!("{who}: {place} answered, but not as finch's rank 0: is MASTER_PORT used by another program?");
    }
    Ok(reply[8..].try_into().expect("128 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
    }

    fn world(rank: usize, size: usize, port: u16) -> World {
        World { rank, size, local_rank: rank, master: Some(("127.0.0.1".into(), port)), launcher: "test" }
    }

    #[test]
    fn every_rank_gets_rank_0s_id_whoever_starts_first() {
        let port = free_port();
        let id: [u8; ID_BYTES] = std::array::from_fn(|i| i as u8);
        let t = Duration::from_secs(20);
        // Ranks 1 and 2 start before rank 0 is listening.
        let clients: Vec<_> =
            (1..3).map(|r| std::thread::spawn(move || exchange_id(&world(r, 3, port), None, t).unwrap())).collect();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(exchange_id(&world(0, 3, port), Some(id), t).unwrap(), id);
        for c in clients {
            assert_eq!(c.join().unwrap(), id);
        }
    }

    #[test]
    fn a_missing_rank_and_an_unreachable_rank_0_are_one_line_each() {
        let port = free_port();
        let t = Duration::from_millis(600);
        let e = format!("{:#}", exchange_id(&world(0, 3, port), Some([0; ID_BYTES]), t).unwrap_err());
        assert!(e.starts_with("rank 0 of 3: ranks 1, 2 did not arrive at port "), "{e}");
        let e = format!("{:#}", exchange_id(&world(2, 3, port), None, t).unwrap_err());
        assert!(
            e.starts_with(&format!("rank 2 of 3: cannot reach rank 0 at 127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT)")),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }

    #[test]
    fn a_process_with_another_world_size_is_refused() {
        let port = free_port();
        let t = Duration::from_secs(10);
        let stray = std::thread::spawn(move || exchange_id(&world(1, 4, port), None, Duration::from_secs(3)));
        let e = format!("{:#}", exchange_id(&world(0, 2, port), Some([1; ID_BYTES]), t).unwrap_err());
        assert!(e.contains("says it is rank 1 of 4: every process of the job must have the same world size"), "{e}");
        assert!(stray.join().unwrap().is_err());
    }

    #[test]
    fn a_busy_port_is_named() {
        let held = TcpListener::bind(("0.0.0.0", 0)).unwrap();
        let port = held.local_addr().unwrap().port();
        let e =
            format!("{:#}", exchange_id(&world(0, 2, port), Some([0; ID_BYTES]), Duration::from_secs(1)).unwrap_err());
        assert!(e.starts_with(&format!("rank 0 of 2: cannot listen on port {port} (MASTER_PORT)")), "{e}");
    }
}
