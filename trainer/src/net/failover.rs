//! Which coordinator node to try: a trainer knows every node's address and moves on to the
//! next one when a connection fails or ends (a standby node refuses at once; a dead one does
//! not answer). It backs off only after every node has failed in a row.

use std::net::SocketAddr;

/// The coordinator nodes a trainer knows, in the order given.
#[derive(Debug, Clone)]
pub struct Coordinators {
    addrs: Vec<SocketAddr>,
    current: usize,
    failed_in_a_row: usize,
}

impl Coordinators {
    /// The nodes, tried in this order from the first; `None` without any.
    pub fn new(addrs: Vec<SocketAddr>) -> Option<Self> {
        (!addrs.is_empty()).then_some(Self {
            addrs,
            current: 0,
            failed_in_a_row: 0,
        })
    }

    /// The node to connect to now.
    pub fn current(&self) -> SocketAddr {
        self.addrs[self.current]
    }

    /// The current node failed (or its session ended): the next one is tried. Returns `true`
    /// when every node has failed since the last connection, so it is time to back off.
    pub fn failed(&mut self) -> bool {
        self.current = (self.current + 1) % self.addrs.len();
        self.failed_in_a_row += 1;
        if self.failed_in_a_row >= self.addrs.len() {
            self.failed_in_a_row = 0;
            true
        } else {
            false
        }
    }

    /// A connection to the current node succeeded.
    pub fn connected(&mut self) {
        self.failed_in_a_row = 0;
    }
}

/// The node that takes the upload of `task` in a cluster: uploads are spread over every node
/// by task id (a standby node stages them for the leader). `None` when that node is `control`
/// (the leader the trainer is connected to: it uploads on its control connection) or there is
/// only one node.
pub fn upload_node(
    nodes: &[SocketAddr],
    task: tributary_shared::TaskId,
    control: SocketAddr,
) -> Option<SocketAddr> {
    if nodes.len() < 2 {
        return None;
    }
    let node = nodes[(task.0 % nodes.len() as u64) as usize];
    (node != control).then_some(node)
}

/// Parses `host:port[,host:port…]`, resolving names.
pub fn parse(list: &str) -> Result<Vec<SocketAddr>, String> {
    let mut addrs = Vec::new();
    for item in list
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        let resolved = std::net::ToSocketAddrs::to_socket_addrs(item)
            .map_err(|error| format!("cannot resolve {item}: {error}"))?
            .next()
            .ok_or_else(|| format!("{item} resolves to no address"))?;
        addrs.push(resolved);
    }
    if addrs.is_empty() {
        return Err("no coordinator address given".into());
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_node_is_tried_before_backing_off() {
        let addrs = parse("127.0.0.1:1, 127.0.0.1:2,127.0.0.1:3").unwrap();
        let mut nodes = Coordinators::new(addrs.clone()).unwrap();
        assert_eq!(nodes.current(), addrs[0]);
        assert!(!nodes.failed());
        assert_eq!(nodes.current(), addrs[1]);
        assert!(!nodes.failed());
        assert_eq!(nodes.current(), addrs[2]);
        assert!(nodes.failed(), "a whole round of failures backs off");
        assert_eq!(nodes.current(), addrs[0]);
        // A connection resets the count: a session that later ends moves on without a pause.
        nodes.connected();
        assert!(!nodes.failed());
        assert_eq!(nodes.current(), addrs[1]);
    }

    #[test]
    fn a_single_node_backs_off_after_each_failure() {
        let mut nodes = Coordinators::new(parse("127.0.0.1:7").unwrap()).unwrap();
        assert!(nodes.failed());
        assert!(nodes.failed());
        assert_eq!(nodes.current().port(), 7);
    }

    #[test]
    fn uploads_spread_by_task_and_stay_on_the_control_connection_for_its_node() {
        use tributary_shared::TaskId;
        let nodes = parse("127.0.0.1:1,127.0.0.1:2,127.0.0.1:3").unwrap();
        assert_eq!(upload_node(&nodes, TaskId(4), nodes[0]), Some(nodes[1]));
        assert_eq!(upload_node(&nodes, TaskId(5), nodes[0]), Some(nodes[2]));
        assert_eq!(upload_node(&nodes, TaskId(6), nodes[0]), None);
        assert_eq!(upload_node(&nodes[..1], TaskId(5), nodes[0]), None);
    }

    #[test]
    fn bad_lists_are_refused() {
        assert!(Coordinators::new(Vec::new()).is_none());
        assert!(parse("").is_err());
        assert!(parse(" , ").is_err());
        assert!(parse("127.0.0.1").is_err());
    }
}
