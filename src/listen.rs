//! The proxy's listening sockets, and the keepalive its connections inherit.
//!
//! Linux copies a listening TCP socket's keepalive settings (`SO_KEEPALIVE`,
//! idle time, interval, probe count and the user timeout) to every socket
//! accepted from it. Pingora 0.9 instead sets `server.tcp_keepalive` on each
//! accepted socket, five system calls per connection, and binds its
//! listening sockets where nothing else can reach them. [`Listening`] binds
//! them first, with the keepalive set, and hands them to Pingora through its
//! table of listening sockets (the one it passes to a new process on a
//! binary upgrade), which Pingora then listens on as on inherited ones. A
//! socket inherited from a previous process gets this process's keepalive
//! settings the same way.

use async_trait::async_trait;
use pingora::server::{Fds, ListenFds, RuntimeOpts, ShutdownWatch};
use pingora::services::Service;
use socket2::{Domain, SockRef, Socket, TcpKeepalive, Type};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, IntoRawFd};
use std::time::Duration;

use crate::config::Keepalive;

/// Pingora's backlog for the listening sockets it binds.
const BACKLOG: i32 = 65535;

/// A listening service whose TCP sockets are bound, or adjusted, here before
/// the service starts.
pub struct Listening<S> {
    inner: S,
    /// The addresses, spelled as the service's listeners are, since that
    /// spelling is the key of Pingora's table.
    addresses: Vec<String>,
    keepalive: Option<Keepalive>,
}

impl<S: Service> Listening<S> {
    pub fn new(inner: S, addresses: Vec<String>, keepalive: Option<Keepalive>) -> Self {
        Self {
            inner,
            addresses,
            keepalive,
        }
    }

    /// Puts a socket for each address into `fds`: one inherited from a
    /// previous process gets this process's keepalive, a missing one is
    /// bound with it. An address in use is tried again once a second, up
    /// to `retries` times, as Pingora does for its own (a process handing
    /// over may hold it a few seconds more). One that still cannot be bound
    /// is left out, for Pingora to bind and report as it would have; its
    /// accepted sockets then have no keepalive, which is logged.
    async fn prepare(&self, fds: &ListenFds, retries: u32) {
        for address in &self.addresses {
            let inherited = {
                let table = fds.lock();
                listener(&table, address).map(|fd| set_keepalive(fd, self.keepalive.as_ref()))
            };
            let result = match inherited {
                Some(result) => result,
                None => bind_retrying(address, self.keepalive.as_ref(), retries)
                    .await
                    .map(|socket| fds.lock().add(address.clone(), socket.into_raw_fd())),
            };
            if let Err(e) = result {
                tracing::error!(
                    %address,
                    error = %e,
                    "cannot prepare the listening socket; its connections get no TCP keepalive"
                );
            }
        }
    }
}

/// How many times, a second apart, an address in use is tried again:
/// Pingora's own bound.
const BIND_RETRIES: u32 = 30;

async fn bind_retrying(
    address: &str,
    keepalive: Option<&Keepalive>,
    retries: u32,
) -> io::Result<Socket> {
    let mut tries = 0;
    loop {
        match bind(address, keepalive) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries < retries => {
                tries += 1;
                tracing::warn!(%address, "address in use; trying again in a second");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            result => return result,
        }
    }
}

#[async_trait]
impl<S: Service> Service for Listening<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        if let Some(fds) = &fds {
            self.prepare(fds, BIND_RETRIES).await;
        }
        self.inner
            .start_service(fds, shutdown, listeners_per_fd)
            .await
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn runtime_opts_override(&self, global: &RuntimeOpts) -> Option<RuntimeOpts> {
        self.inner.runtime_opts_override(global)
    }

    fn on_startup_delay(&self, time_waited: Duration) {
        self.inner.on_startup_delay(time_waited)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}

/// The listening socket Pingora's table holds for `address`.
fn listener<'t>(table: &'t Fds, address: &str) -> Option<BorrowedFd<'t>> {
    let fd = *table.get(address)?;
    #[allow(unsafe_code)]
    // SAFETY: the table's descriptors are open listening sockets. Pingora
    // closes one through `&mut Fds` only, or once a service's listener has
    // taken it over, which `prepare` comes before: none closes while the
    // table is borrowed here.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    Some(fd)
}

/// A listening socket for `address`, bound as Pingora binds its own
/// (`SO_REUSEADDR`, the first address the name resolves to, non-blocking)
/// and with `keepalive` set before it listens.
fn bind(address: &str, keepalive: Option<&Keepalive>) -> io::Result<Socket> {
    let addr: SocketAddr = address.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the address resolves to nothing",
        )
    })?;

    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None)?;
    socket.set_reuse_address(true)?;
    set_keepalive(socket.as_fd(), keepalive)?;

    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket)
}

/// Sets `keepalive` on a socket, or turns keepalive and the user timeout
/// off. The user timeout bounds how long unacknowledged data may sit, so a
/// vanished peer with a full send buffer is reaped too, not only an idle
/// one.
fn set_keepalive(fd: BorrowedFd<'_>, keepalive: Option<&Keepalive>) -> io::Result<()> {
    let socket = SockRef::from(&fd);
    match keepalive {
        Some(k) => {
            let params = TcpKeepalive::new()
                .with_time(k.idle)
                .with_interval(k.interval)
                .with_retries(u32::try_from(k.count).unwrap_or(u32::MAX));
            socket.set_tcp_keepalive(&params)?;
            socket.set_keepalive(true)?;
            socket.set_tcp_user_timeout(Some(user_timeout(k)))
        }
        None => {
            socket.set_keepalive(false)?;
            socket.set_tcp_user_timeout(None)
        }
    }
}

/// How long a peer may go unheard (or leave data unacknowledged) before
/// the connection is dropped: the idle time and every probe.
pub fn user_timeout(k: &Keepalive) -> Duration {
    let count = u32::try_from(k.count).unwrap_or(u32::MAX);
    k.interval.saturating_mul(count).saturating_add(k.idle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const KEEPALIVE: Keepalive = Keepalive {
        idle: Duration::from_secs(61),
        interval: Duration::from_secs(11),
        count: 7,
    };

    /// The keepalive a socket has, as the kernel reports it: on or off, and
    /// the idle time, interval, probes and user timeout.
    fn keepalive_of(fd: BorrowedFd<'_>) -> (bool, Duration, Duration, u32, Option<Duration>) {
        let s = SockRef::from(&fd);
        (
            s.keepalive().unwrap(),
            s.tcp_keepalive_time().unwrap(),
            s.tcp_keepalive_interval().unwrap(),
            s.tcp_keepalive_retries().unwrap(),
            s.tcp_user_timeout().unwrap(),
        )
    }

    fn configured() -> (bool, Duration, Duration, u32, Option<Duration>) {
        (
            true,
            Duration::from_secs(61),
            Duration::from_secs(11),
            7,
            Some(Duration::from_secs(61 + 11 * 7)),
        )
    }

    /// Connects to `listener` and accepts the connection from it.
    fn accept(listener: &Socket) -> (Socket, std::net::TcpStream) {
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        // The listener does not block; on loopback the connection is
        // queued by the time `connect` returns, give or take a moment.
        for _ in 0..1000 {
            match listener.accept() {
                Ok((accepted, _)) => return (accepted, client),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        panic!("no connection to accept within 5 s");
    }

    fn table() -> ListenFds {
        Arc::new(Fds::new().into())
    }

    /// A descriptor of the listening socket `fds` holds for `address`.
    fn listener_in(fds: &ListenFds, address: &str) -> Socket {
        let table = fds.lock();
        let fd = listener(&table, address).expect("a socket for the address");
        SockRef::from(&fd).try_clone().unwrap()
    }

    /// Closes every socket in `fds`.
    fn close(fds: &ListenFds) {
        fds.lock().close_unclaimed(&Default::default());
    }

    #[test]
    fn an_accepted_socket_inherits_the_listening_sockets_keepalive() {
        let listener = bind("127.0.0.1:0", Some(&KEEPALIVE)).unwrap();
        assert_eq!(keepalive_of(listener.as_fd()), configured());

        let (accepted, _client) = accept(&listener);
        assert_eq!(keepalive_of(accepted.as_fd()), configured());
    }

    #[test]
    fn without_keepalive_an_accepted_socket_has_none() {
        let listener = bind("127.0.0.1:0", None).unwrap();
        let (accepted, _client) = accept(&listener);
        let (on, .., user_timeout) = keepalive_of(accepted.as_fd());
        assert!(!on);
        assert_eq!(user_timeout, None);
    }

    #[tokio::test]
    async fn a_missing_address_is_bound_into_the_table() {
        let address = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let fds = table();

        Listening::new(Nothing, vec![address.clone()], Some(KEEPALIVE))
            .prepare(&fds, 0)
            .await;

        let listener = listener_in(&fds, &address);
        assert_eq!(
            listener
                .local_addr()
                .unwrap()
                .as_socket()
                .unwrap()
                .to_string(),
            address
        );
        let (accepted, _client) = accept(&listener);
        assert_eq!(keepalive_of(accepted.as_fd()), configured());
        close(&fds);
    }

    #[tokio::test]
    async fn an_inherited_socket_takes_this_processs_keepalive() {
        let fds = table();
        let inherited = bind("127.0.0.1:0", None).unwrap();
        let address = inherited
            .local_addr()
            .unwrap()
            .as_socket()
            .unwrap()
            .to_string();
        fds.lock().add(address.clone(), inherited.into_raw_fd());

        Listening::new(Nothing, vec![address.clone()], Some(KEEPALIVE))
            .prepare(&fds, 0)
            .await;
        let (accepted, _client) = accept(&listener_in(&fds, &address));
        assert_eq!(keepalive_of(accepted.as_fd()), configured());

        // And a config without keepalive turns it off again.
        Listening::new(Nothing, vec![address.clone()], None)
            .prepare(&fds, 0)
            .await;
        let (accepted, _client) = accept(&listener_in(&fds, &address));
        assert!(!keepalive_of(accepted.as_fd()).0);

        close(&fds);
    }

    #[tokio::test]
    async fn an_address_that_cannot_be_bound_is_left_to_pingora() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = taken.local_addr().unwrap().to_string();
        let fds = table();

        Listening::new(Nothing, vec![address.clone()], Some(KEEPALIVE))
            .prepare(&fds, 0)
            .await;

        assert!(fds.lock().get(&address).is_none());
    }

    #[tokio::test]
    async fn an_address_freed_while_retrying_is_bound_with_keepalive() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = taken.local_addr().unwrap().to_string();
        let fds = table();

        // Held past the first try, as by a process still handing over.
        let freed = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(taken);
        });
        Listening::new(Nothing, vec![address.clone()], Some(KEEPALIVE))
            .prepare(&fds, 5)
            .await;
        freed.join().unwrap();

        let (accepted, _client) = accept(&listener_in(&fds, &address));
        assert_eq!(keepalive_of(accepted.as_fd()), configured());
        close(&fds);
    }

    struct Nothing;

    #[async_trait]
    impl Service for Nothing {
        fn name(&self) -> &str {
            "nothing"
        }
    }
}
