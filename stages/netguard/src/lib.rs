//! lipsync network guard: the URL policy and SSRF guard of every outgoing HTTP request
//! (input downloads of the fetch stage, result uploads of the mux stage, webhooks and URL
//! checks of the gateway).
//!
//! Three layers, all driven by one [`UrlPolicy`]:
//!
//! 1. [`UrlPolicy::check_url`] vets a URL before any request is made: scheme (http/https
//!    only), length, userinfo, port (allow-list), host present, and, when the host is an IP literal, the
//!    address itself. The `url` crate normalises the odd spellings of IPv4 (`2130706433`,
//!    `0x7f000001`, `127.1`, `0177.0.0.1`) and IPv6 (`[::ffff:127.0.0.1]`), so those are
//!    classified like `127.0.0.1`.
//! 2. [`GuardedResolver`] is the DNS resolver of the client: it resolves a host name once,
//!    drops every address the policy forbids and fails if none remains. The connection
//!    goes to one of the addresses it returned, so there is no second lookup that a DNS
//!    rebinding attack could answer differently.
//! 3. The redirect policy of the client re-runs `check_url` on every hop (IP-literal hops
//!    are refused there, host-name hops are vetted by the resolver when they connect) and
//!    caps the number of hops.
//!
//! [`UrlPolicy::client`] builds a [`GuardedClient`] with all three. Requests must start
//! from [`GuardedClient::get`] / [`GuardedClient::post`] / [`GuardedClient::put`] (or a
//! URL returned by [`GuardedClient::check_url`]): reqwest connects to an IP-literal host
//! without asking the resolver, so the first URL has to be checked before the request is
//! sent.
//!
//! `allow_private_networks = true` opens every address and port except the well-known
//! cloud metadata addresses (tests, local demos). `allow_cidrs` opens exact ranges and is
//! the only way to reach a metadata address (the Azure wire server 168.63.129.16 included,
//! although it is a public address).
//!
//! Addresses inside a NAT64 prefix (`nat64_prefixes`, default the well-known
//! `64:ff9b::/96`) are judged by the IPv4 address they embed.
//!
//! Refusal messages never name the address a host name resolved to (they end up in task
//! error messages that clients read); the address is logged at debug level only.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use url::{Host, Url};

/// The error code (see the `schemas` error-code enum) of a policy refusal.
pub const CODE_URL_NOT_ALLOWED: &str = "url_not_allowed";

/// Schemes the guard can ever allow; `allowed_schemes` may narrow them, never widen them.
const SUPPORTED_SCHEMES: [&str; 2] = ["http", "https"];

/// User agent of every guarded client.
pub const USER_AGENT: &str = concat!("lipsync/", env!("CARGO_PKG_VERSION"));

/// Ports allowed by default.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];

/// The well-known NAT64 prefix (RFC 6052).
pub const WELL_KNOWN_NAT64: &str = "64:ff9b::/96";

/// Why a URL, a host or an address was refused (or could not be vetted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    /// Not a URL at all (no scheme, bad syntax).
    #[error("the URL is not valid: {reason}")]
    InvalidUrl { reason: String },
    /// Longer than `max_url_len`.
    #[error("the URL is {len} characters long; at most {max} are allowed")]
    UrlTooLong { len: usize, max: usize },
    /// A scheme other than the allowed http/https.
    #[error("the URL scheme '{scheme}' is not allowed; use http or https")]
    SchemeNotAllowed { scheme: String },
    /// `user:pass@host` URLs are refused.
    #[error("URLs with credentials (user:password@host) are not allowed")]
    UserinfoNotAllowed,
    /// No host, or an empty one.
    #[error("the URL has no host")]
    MissingHost,
    /// The host is (or resolves only to) an address the policy forbids. `ip` is for logs
    /// and tests: the message shows it only when the URL itself holds that IP literal.
    #[error("{}", address_refusal(host, *resolved, reason))]
    AddressNotAllowed {
        host: String,
        ip: IpAddr,
        reason: &'static str,
        /// Whether `ip` came from name resolution (then the message does not show it).
        resolved: bool,
    },
    /// The port is not in the allow-list.
    #[error("port {port} is not allowed; allowed ports: {allowed}")]
    PortNotAllowed { port: u16, allowed: String },
    /// Host-name resolution failed (not a policy refusal: maps to `download_failed`).
    #[error("could not resolve host '{host}': {reason}")]
    ResolveFailed { host: String, reason: String },
    /// More redirect hops than configured (maps to `download_failed`).
    #[error("too many redirects (more than {max})")]
    TooManyRedirects { max: usize },
    /// The HTTP client could not be built (maps to `internal`).
    #[error("could not build the HTTP client: {reason}")]
    Client { reason: String },
}

impl GuardError {
    /// True when the request was refused by the policy (error code `url_not_allowed`).
    pub fn is_policy_refusal(&self) -> bool {
        matches!(
            self,
            Self::InvalidUrl { .. }
                | Self::UrlTooLong { .. }
                | Self::SchemeNotAllowed { .. }
                | Self::UserinfoNotAllowed
                | Self::MissingHost
                | Self::AddressNotAllowed { .. }
                | Self::PortNotAllowed { .. }
        )
    }

    /// The service error code: `url_not_allowed` for policy refusals, `download_failed`
    /// for DNS failures and redirect loops, `internal` for a client that cannot be built.
    pub fn code(&self) -> &'static str {
        match self {
            _ if self.is_policy_refusal() => CODE_URL_NOT_ALLOWED,
            Self::ResolveFailed { .. } | Self::TooManyRedirects { .. } => "download_failed",
            _ => "internal",
        }
    }

    /// Finds a `GuardError` in the source chain of an error (e.g. a `reqwest::Error`
    /// caused by the resolver or the redirect policy).
    pub fn find_in<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a GuardError> {
        let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(g) = e.downcast_ref::<GuardError>() {
                return Some(g);
            }
            cur = e.source();
        }
        None
    }
}

fn address_refusal(host: &str, resolved: bool, reason: &str) -> String {
    if resolved {
        format!("host '{host}' resolves only to addresses that are not allowed ({reason})")
    } else {
        format!("the address {host} is not allowed ({reason})")
    }
}

/// An IPv4 or IPv6 network in CIDR notation (`10.1.0.0/16`, `fd00::/8`, or a bare
/// address meaning a single host). Serialised as that string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// A network; host bits of `addr` are cleared. Fails when the prefix is too long.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, String> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("prefix /{prefix} is longer than {max} bits"));
        }
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(prefix))),
        };
        Ok(Self { addr, prefix })
    }

    /// Network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in this network. IPv4-mapped IPv6 addresses match IPv4 networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => in_v4(ip, net, self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => in_v6(ip, net, self.prefix),
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (
                a,
                Some(
                    p.parse::<u8>()
                        .map_err(|_| format!("invalid prefix length in '{s}'"))?,
                ),
            ),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("invalid IP address in '{s}'"))?;
        let prefix = prefix.unwrap_or(if addr.is_ipv4() { 32 } else { 128 });
        Self::new(addr, prefix)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for IpNet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What outgoing requests may reach. Deserialisable from a config section
/// (`fetch.allow_private_networks`, `fetch.allow_cidrs`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UrlPolicy {
    /// Allow loopback, private, link-local, ... targets (tests and local demos only).
    /// Cloud metadata addresses stay refused unless listed in `allow_cidrs`.
    pub allow_private_networks: bool,
    /// Networks that are allowed even though the address classes above forbid them
    /// (e.g. an internal media server). Exact and explicit: `10.2.3.4/32`, `fd12::/64`.
    pub allow_cidrs: Vec<IpNet>,
    /// Longest URL accepted, in bytes.
    pub max_url_len: usize,
    /// Allowed schemes, a subset of http/https.
    pub allowed_schemes: Vec<String>,
    /// Allowed destination ports (the URL's port, or 80/443 by scheme). Empty: any port.
    /// Not enforced when `allow_private_networks` is on.
    pub allowed_ports: Vec<u16>,
    /// NAT64 prefixes (/96 only): an address inside one is judged by the IPv4 address in
    /// its last 32 bits.
    pub nat64_prefixes: Vec<IpNet>,
}

impl Default for UrlPolicy {
    fn default() -> Self {
        Self {
            allow_private_networks: false,
            allow_cidrs: Vec::new(),
            max_url_len: 2048,
            allowed_schemes: SUPPORTED_SCHEMES.iter().map(|s| s.to_string()).collect(),
            allowed_ports: DEFAULT_PORTS.to_vec(),
            nat64_prefixes: vec![well_known_nat64()],
        }
    }
}

/// Connection settings of a [`GuardedClient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// DNS resolution + TCP connect + TLS handshake.
    pub connect_timeout: Duration,
    /// Longest wait for any single read from the connection (headers or body).
    pub read_timeout: Duration,
    /// Whole-request timeout set on the client; `None` leaves it to the caller
    /// (`download_to` enforces its own total deadline).
    pub total_timeout: Option<Duration>,
    /// Redirect hops followed at most.
    pub max_redirects: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            total_timeout: None,
            max_redirects: 5,
        }
    }
}

fn well_known_nat64() -> IpNet {
    IpNet {
        addr: IpAddr::V6(v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0])),
        prefix: 96,
    }
}

/// The configuration keys a [`UrlPolicy`] is built from (one config section, e.g. the
/// fetch stage's download policy or the gateway's webhook policy).
#[derive(Debug, Clone, Copy)]
pub struct PolicySettings<'a> {
    /// Key prefix named in error messages, e.g. `fetch` or `gateway.webhook`.
    pub section: &'a str,
    /// See [`UrlPolicy::allow_private_networks`].
    pub allow_private_networks: bool,
    /// CIDR strings, see [`UrlPolicy::allow_cidrs`].
    pub allow_cidrs: &'a [String],
    /// See [`UrlPolicy::allowed_ports`].
    pub allowed_ports: &'a [u16],
    /// /96 prefixes as CIDR strings, see [`UrlPolicy::nat64_prefixes`].
    pub nat64_prefixes: &'a [String],
    /// See [`UrlPolicy::max_url_len`].
    pub max_url_len: usize,
}

impl UrlPolicy {
    /// Build a policy from configuration values; errors name the bad key.
    pub fn from_settings(s: &PolicySettings<'_>) -> Result<Self, String> {
        let cidr_key = if s.section.ends_with("webhook") {
            format!("{}_allow_cidrs", s.section)
        } else {
            format!("{}.allow_cidrs", s.section)
        };
        let mut allow_cidrs = Vec::new();
        for c in s.allow_cidrs {
            allow_cidrs.push(
                c.parse::<IpNet>()
                    .map_err(|e| format!("{cidr_key}: `{c}`: {e}"))?,
            );
        }
        let mut nat64_prefixes = Vec::new();
        for c in s.nat64_prefixes {
            let net = c
                .parse::<IpNet>()
                .map_err(|e| format!("{}.nat64_prefixes: `{c}`: {e}", s.section))?;
            if !net.addr.is_ipv6() || net.prefix != 96 {
                return Err(format!(
                    "{}.nat64_prefixes: `{c}`: only IPv6 /96 prefixes are supported",
                    s.section
                ));
            }
            nat64_prefixes.push(net);
        }
        if s.allowed_ports.contains(&0) {
            return Err(format!("{}: port 0 in the allowed ports", s.section));
        }
        Ok(Self {
            allow_private_networks: s.allow_private_networks,
            allow_cidrs,
            max_url_len: s.max_url_len,
            allowed_ports: s.allowed_ports.to_vec(),
            nat64_prefixes,
            ..Self::default()
        })
    }

    /// Policy that allows private networks (tests, local demos).
    pub fn permissive() -> Self {
        Self {
            allow_private_networks: true,
            ..Self::default()
        }
    }

    /// Vets a URL string: length, syntax, scheme, userinfo, host, and the address when
    /// the host is an IP literal. Host names are vetted later by [`GuardedResolver`].
    pub fn check_url(&self, raw: &str) -> Result<Url, GuardError> {
        if raw.len() > self.max_url_len {
            return Err(GuardError::UrlTooLong {
                len: raw.len(),
                max: self.max_url_len,
            });
        }
        let url = Url::parse(raw).map_err(|e| GuardError::InvalidUrl {
            reason: match e {
                url::ParseError::RelativeUrlWithoutBase => {
                    "it has no scheme (expected http:// or https://)".to_string()
                }
                other => other.to_string(),
            },
        })?;
        self.check_parsed(&url)?;
        Ok(url)
    }

    /// [`check_url`](Self::check_url) for an already parsed URL (redirect hops).
    pub fn check_parsed(&self, url: &Url) -> Result<(), GuardError> {
        if url.as_str().len() > self.max_url_len {
            return Err(GuardError::UrlTooLong {
                len: url.as_str().len(),
                max: self.max_url_len,
            });
        }
        let scheme = url.scheme();
        if !SUPPORTED_SCHEMES.contains(&scheme)
            || !self
                .allowed_schemes
                .iter()
                .any(|s| s.eq_ignore_ascii_case(scheme))
        {
            return Err(GuardError::SchemeNotAllowed {
                scheme: scheme.chars().take(32).collect(),
            });
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(GuardError::UserinfoNotAllowed);
        }
        if let Some(port) = url.port_or_known_default()
            && !self.port_allowed(port)
        {
            return Err(GuardError::PortNotAllowed {
                port,
                allowed: self
                    .allowed_ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        match url.host() {
            None => Err(GuardError::MissingHost),
            Some(Host::Domain(d)) if d.is_empty() || d == "." => Err(GuardError::MissingHost),
            Some(Host::Domain(_)) => Ok(()),
            Some(Host::Ipv4(v4)) => self.check_ip(&v4.to_string(), IpAddr::V4(v4)),
            Some(Host::Ipv6(v6)) => self.check_ip(&format!("[{v6}]"), IpAddr::V6(v6)),
        }
    }

    /// Whether the port allow-list lets `port` through.
    pub fn port_allowed(&self, port: u16) -> bool {
        self.allow_private_networks
            || self.allowed_ports.is_empty()
            || self.allowed_ports.contains(&port)
    }

    /// Whether the policy allows connecting to `ip`; on refusal, why.
    pub fn ip_refusal(&self, ip: IpAddr) -> Option<&'static str> {
        if self.allow_cidrs.iter().any(|net| net.contains(ip)) {
            return None;
        }
        if is_cloud_metadata_with(ip, &self.nat64_prefixes) {
            return Some("cloud metadata endpoint");
        }
        if self.allow_private_networks {
            return None;
        }
        forbidden_reason_with(ip, &self.nat64_prefixes)
    }

    fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), GuardError> {
        match self.ip_refusal(ip) {
            None => Ok(()),
            Some(reason) => Err(GuardError::AddressNotAllowed {
                host: host.to_string(),
                ip,
                reason,
                resolved: false,
            }),
        }
    }

    /// Builds an HTTP client that enforces this policy: guarded resolver, per-hop
    /// redirect checks, timeouts, no proxy from the environment, no Referer, our user agent.
    pub fn client(&self, options: &ClientOptions) -> Result<GuardedClient, GuardError> {
        let policy = Arc::new(self.clone());
        let redirect_policy = {
            let policy = policy.clone();
            let max = options.max_redirects;
            reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() > max {
                    return attempt.error(GuardError::TooManyRedirects { max });
                }
                match policy.check_parsed(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(e) => attempt.error(e),
                }
            })
        };
        let mut builder = reqwest::Client::builder()
            .dns_resolver(GuardedResolver::new(policy.clone()))
            .redirect(redirect_policy)
            .referer(false)
            .no_proxy()
            .connect_timeout(options.connect_timeout)
            .read_timeout(options.read_timeout)
            .user_agent(USER_AGENT);
        if let Some(total) = options.total_timeout {
            builder = builder.timeout(total);
        }
        let http = builder.build().map_err(|e| GuardError::Client {
            reason: e.to_string(),
        })?;
        Ok(GuardedClient {
            http,
            policy,
            options: options.clone(),
        })
    }
}

/// A `reqwest::Client` bound to the [`UrlPolicy`] it was built from.
#[derive(Debug, Clone)]
pub struct GuardedClient {
    http: reqwest::Client,
    policy: Arc<UrlPolicy>,
    options: ClientOptions,
}

impl GuardedClient {
    /// Vets a URL with the client's policy (call before sending any request).
    pub fn check_url(&self, raw: &str) -> Result<Url, GuardError> {
        self.policy.check_url(raw)
    }

    /// A GET request to a vetted URL.
    pub fn get(&self, raw: &str) -> Result<reqwest::RequestBuilder, GuardError> {
        Ok(self.http.get(self.check_url(raw)?))
    }

    /// A POST request to a vetted URL (webhooks).
    pub fn post(&self, raw: &str) -> Result<reqwest::RequestBuilder, GuardError> {
        Ok(self.http.post(self.check_url(raw)?))
    }

    /// A PUT request to a vetted URL (result uploads to a client's presigned URL).
    pub fn put(&self, raw: &str) -> Result<reqwest::RequestBuilder, GuardError> {
        Ok(self.http.put(self.check_url(raw)?))
    }

    /// The underlying client. Its resolver and redirect policy are guarded, but the
    /// *first* URL of a request built from it directly is not: check it with
    /// [`check_url`](Self::check_url) first.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The policy this client enforces.
    pub fn policy(&self) -> &UrlPolicy {
        &self.policy
    }

    /// The options the client was built with.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }
}

/// DNS resolver that only returns addresses the policy allows. Resolution uses the
/// system resolver (`tokio::net::lookup_host`, i.e. getaddrinfo, honouring /etc/hosts).
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    policy: Arc<UrlPolicy>,
}

impl GuardedResolver {
    /// A resolver enforcing `policy`.
    pub fn new(policy: Arc<UrlPolicy>) -> Self {
        Self { policy }
    }

    /// Resolves `host` and keeps the allowed addresses (port 0: reqwest fills it in).
    pub async fn resolve_host(&self, host: &str) -> Result<Vec<SocketAddr>, GuardError> {
        resolve_allowed(&self.policy, host).await
    }
}

async fn resolve_allowed(policy: &UrlPolicy, host: &str) -> Result<Vec<SocketAddr>, GuardError> {
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
        .await
        .map_err(|e| GuardError::ResolveFailed {
            host: host.to_string(),
            reason: e.to_string(),
        })?
        .collect();
    let mut first_refusal = None;
    let mut allowed = Vec::with_capacity(resolved.len());
    for addr in resolved {
        match policy.ip_refusal(addr.ip()) {
            None => allowed.push(addr),
            Some(reason) => {
                tracing::debug!(host, ip = %addr.ip(), reason, "resolved address refused");
                first_refusal.get_or_insert((addr.ip(), reason));
            }
        }
    }
    if !allowed.is_empty() {
        return Ok(allowed);
    }
    Err(match first_refusal {
        Some((ip, reason)) => GuardError::AddressNotAllowed {
            host: host.to_string(),
            ip,
            reason,
            resolved: true,
        },
        None => GuardError::ResolveFailed {
            host: host.to_string(),
            reason: "no addresses".to_string(),
        },
    })
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = resolve_allowed(&policy, &host).await?;
            let addrs: Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// Whether an address is one that downloads must never reach by default.
pub fn is_forbidden(ip: IpAddr) -> bool {
    forbidden_reason(ip).is_some()
}

/// Why an address is forbidden (`None` for a public unicast address), with the
/// well-known NAT64 prefix. Cloud metadata addresses that are public (the Azure wire
/// server) are not "forbidden" here: [`UrlPolicy::ip_refusal`] refuses them separately.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    forbidden_reason_with(ip, &[well_known_nat64()])
}

/// [`forbidden_reason`] with the given NAT64 prefixes.
pub fn forbidden_reason_with(ip: IpAddr, nat64: &[IpNet]) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => v6_reason(v6, nat64),
    }
}

/// Whether `ip` is a well-known cloud metadata endpoint (in any IPv6 spelling of it).
pub fn is_cloud_metadata(ip: IpAddr) -> bool {
    is_cloud_metadata_with(ip, &[well_known_nat64()])
}

/// The innermost error of `e`'s source chain, as text: what a failed request reports
/// (a connection refused, a reset) without the URL its outer layers carry.
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

fn in_nat64(ip: Ipv6Addr, nat64: &[IpNet]) -> bool {
    nat64.iter().any(|n| n.contains(IpAddr::V6(ip)))
}

fn mask32(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

fn mask128(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix))
    }
}

fn in_v4(ip: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    let m = mask32(prefix);
    u32::from(ip) & m == u32::from(net) & m
}

fn in_v6(ip: Ipv6Addr, net: Ipv6Addr, prefix: u8) -> bool {
    let m = mask128(prefix);
    u128::from(ip) & m == u128::from(net) & m
}

const fn v4(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

/// IPv4 special-purpose ranges (IANA registry, RFC 6890 and successors).
const V4_FORBIDDEN: &[(Ipv4Addr, u8, &str)] = &[
    (v4(255, 255, 255, 255), 32, "broadcast"),
    (v4(0, 0, 0, 0), 32, "unspecified"),
    (v4(0, 0, 0, 0), 8, "\"this network\" 0.0.0.0/8"),
    (v4(127, 0, 0, 0), 8, "loopback"),
    (v4(10, 0, 0, 0), 8, "private network"),
    (v4(172, 16, 0, 0), 12, "private network"),
    (v4(192, 168, 0, 0), 16, "private network"),
    (v4(169, 254, 0, 0), 16, "link-local / cloud metadata"),
    (v4(100, 64, 0, 0), 10, "carrier-grade NAT"),
    (v4(192, 0, 0, 0), 24, "IETF protocol assignments"),
    (v4(192, 0, 2, 0), 24, "documentation"),
    (v4(198, 51, 100, 0), 24, "documentation"),
    (v4(203, 0, 113, 0), 24, "documentation"),
    (v4(192, 88, 99, 0), 24, "6to4 relay anycast"),
    (v4(198, 18, 0, 0), 15, "benchmarking"),
    (v4(224, 0, 0, 0), 4, "multicast"),
    (v4(240, 0, 0, 0), 4, "reserved"),
];

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    V4_FORBIDDEN
        .iter()
        .find(|(net, prefix, _)| in_v4(ip, *net, *prefix))
        .map(|(_, _, reason)| *reason)
}

const fn v6(s: [u16; 8]) -> Ipv6Addr {
    Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7])
}

/// IPv6 ranges refused outright (the embedded-IPv4 ranges are handled separately).
const V6_FORBIDDEN: &[(Ipv6Addr, u8, &str)] = &[
    (v6([0, 0, 0, 0, 0, 0, 0, 0]), 128, "unspecified"),
    (v6([0, 0, 0, 0, 0, 0, 0, 1]), 128, "loopback"),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0]), 64, "discard-only"),
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0]), 48, "local-use NAT64"),
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0]), 32, "Teredo"),
    (v6([0x2001, 0x2, 0, 0, 0, 0, 0, 0]), 48, "benchmarking"),
    (v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0]), 32, "documentation"),
    (v6([0x3fff, 0, 0, 0, 0, 0, 0, 0]), 20, "documentation"),
    (
        v6([0x2001, 0, 0, 0, 0, 0, 0, 0]),
        23,
        "IETF protocol assignments",
    ),
    (v6([0x5f00, 0, 0, 0, 0, 0, 0, 0]), 16, "segment routing"),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0]), 7, "unique local"),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0]), 10, "link-local"),
    (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0]), 10, "site-local"),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0]), 8, "multicast"),
];

/// Globally reachable exceptions inside 2001::/23 (IANA IPv6 special registry).
const V6_GLOBAL_EXCEPTIONS: &[(Ipv6Addr, u8)] = &[
    (v6([0x2001, 1, 0, 0, 0, 0, 0, 1]), 128),
    (v6([0x2001, 1, 0, 0, 0, 0, 0, 2]), 128),
    (v6([0x2001, 3, 0, 0, 0, 0, 0, 0]), 32),
    (v6([0x2001, 4, 0x112, 0, 0, 0, 0, 0]), 48),
    (v6([0x2001, 0x20, 0, 0, 0, 0, 0, 0]), 28),
];

fn v6_reason(ip: Ipv6Addr, nat64: &[IpNet]) -> Option<&'static str> {
    let bits = u128::from(ip);
    let low32 = Ipv4Addr::from((bits & 0xffff_ffff) as u32);
    // IPv4-mapped ::ffff:0:0/96: exactly the embedded IPv4's verdict.
    if in_v6(ip, v6([0, 0, 0, 0, 0, 0xffff, 0, 0]), 96) {
        return v4_reason(low32).map(|_| "IPv4-mapped address of a forbidden IPv4 address");
    }
    // NAT64 prefixes (the well-known 64:ff9b::/96 by default).
    if in_nat64(ip, nat64) {
        return v4_reason(low32).map(|_| "NAT64 address of a forbidden IPv4 address");
    }
    // 6to4 2002::/16: the IPv4 is in bits 16..48.
    if in_v6(ip, v6([0x2002, 0, 0, 0, 0, 0, 0, 0]), 16) {
        let embedded = Ipv4Addr::from(((bits >> 80) & 0xffff_ffff) as u32);
        return v4_reason(embedded).map(|_| "6to4 address of a forbidden IPv4 address");
    }
    if let Some((_, _, reason)) = V6_FORBIDDEN
        .iter()
        .find(|(net, prefix, _)| in_v6(ip, *net, *prefix))
    {
        let exception = V6_GLOBAL_EXCEPTIONS
            .iter()
            .any(|(net, prefix)| in_v6(ip, *net, *prefix));
        return (!exception).then_some(*reason);
    }
    // Deprecated IPv4-compatible ::/96 (:: and ::1 were handled above).
    if in_v6(ip, Ipv6Addr::UNSPECIFIED, 96) {
        return v4_reason(low32).map(|_| "IPv4-compatible address of a forbidden IPv4 address");
    }
    // Everything outside global unicast 2000::/3 is reserved or special.
    if !in_v6(ip, v6([0x2000, 0, 0, 0, 0, 0, 0, 0]), 3) {
        return Some("reserved IPv6 range");
    }
    None
}

/// Well-known cloud metadata and host-agent endpoints: the instance metadata address
/// of AWS/GCP/Azure/OCI/OpenStack/DigitalOcean, AWS ECS task metadata, AWS DNS and time,
/// the Azure wire server (a public address), OCI's legacy metadata, Alibaba, Tencent,
/// and the IPv6 metadata addresses of AWS and GCP.
const META: &[IpAddr] = &[
    IpAddr::V4(v4(169, 254, 169, 254)),
    IpAddr::V4(v4(169, 254, 170, 2)),
    IpAddr::V4(v4(169, 254, 170, 23)),
    IpAddr::V4(v4(169, 254, 169, 253)),
    IpAddr::V4(v4(169, 254, 169, 123)),
    IpAddr::V4(v4(168, 63, 129, 16)),
    IpAddr::V4(v4(192, 0, 0, 192)),
    IpAddr::V4(v4(100, 100, 100, 200)),
    IpAddr::V4(v4(169, 254, 0, 23)),
    IpAddr::V6(v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254])),
    IpAddr::V6(v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23])),
    IpAddr::V6(v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x123])),
    IpAddr::V6(v6([0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254])),
];

fn is_cloud_metadata_with(ip: IpAddr, nat64: &[IpNet]) -> bool {
    let canonical = ip.to_canonical();
    if META.contains(&canonical) {
        return true;
    }
    // The same endpoints behind NAT64 / 6to4 / IPv4-compatible spellings.
    if let IpAddr::V6(v6addr) = canonical {
        let bits = u128::from(v6addr);
        let low32 = IpAddr::V4(Ipv4Addr::from((bits & 0xffff_ffff) as u32));
        let sixto4 = IpAddr::V4(Ipv4Addr::from(((bits >> 80) & 0xffff_ffff) as u32));
        if (in_nat64(v6addr, nat64) || in_v6(v6addr, Ipv6Addr::UNSPECIFIED, 96))
            && META.contains(&low32)
        {
            return true;
        }
        if in_v6(v6addr, v6([0x2002, 0, 0, 0, 0, 0, 0, 0]), 16) && META.contains(&sixto4) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forbidden_v4_ranges() {
        for s in [
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "169.254.0.1",
            "100.64.0.1",
            "100.127.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "0.0.0.0",
            "0.1.2.3",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "198.18.0.1",
            "198.19.255.255",
            "240.0.0.1",
            "192.0.0.8",
        ] {
            assert!(is_forbidden(ip(s)), "{s} should be forbidden");
        }
    }

    #[test]
    fn allowed_v4() {
        for s in [
            "93.184.216.34",
            "8.8.8.8",
            "1.1.1.1",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "198.17.255.255",
            "198.20.0.1",
            "223.255.255.255",
            "11.0.0.1",
            "169.253.255.255",
        ] {
            assert!(!is_forbidden(ip(s)), "{s} should be allowed");
        }
    }

    #[test]
    fn forbidden_v6_ranges() {
        for s in [
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:0.0.0.0",
            "::127.0.0.1",
            "::10.1.2.3",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2002:7f00:0001::1",
            "2002:c0a8:0101::",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "ff0e::1",
            "100::1",
            "2001:db8::1",
            "2001::1",
            "2001:2::1",
            "3fff::1",
            "5f00::1",
            "4000::1",
            "::2:3:4:5:6",
        ] {
            assert!(is_forbidden(ip(s)), "{s} should be forbidden");
        }
    }

    #[test]
    fn allowed_v6() {
        for s in [
            "2606:2800::1",
            "2606:2800:220:1:248:1893:25c8:1946",
            "2a00:1450:4001::1",
            "::ffff:93.184.216.34",
            "64:ff9b::808:808",
            "2002:5db8:d822::1",
            "2001:4860:4860::8888",
            "2001:20::1",
            "2001:3::1",
        ] {
            assert!(!is_forbidden(ip(s)), "{s} should be allowed");
        }
    }

    #[test]
    fn cidr_parse_and_contains() {
        let net: IpNet = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains(ip("10.1.200.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        assert!(net.contains(ip("::ffff:10.1.0.9")));
        let host: IpNet = "127.0.0.2".parse().unwrap();
        assert_eq!(host.to_string(), "127.0.0.2/32");
        assert!(host.contains(ip("127.0.0.2")));
        assert!(!host.contains(ip("127.0.0.1")));
        let v6net: IpNet = "fd00::1/8".parse().unwrap();
        assert_eq!(v6net.to_string(), "fd00::/8");
        assert!(v6net.contains(ip("fdff::1")));
        assert!(!v6net.contains(ip("10.0.0.1")));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("nonsense".parse::<IpNet>().is_err());
        assert!(
            "0.0.0.0/0"
                .parse::<IpNet>()
                .unwrap()
                .contains(ip("8.8.8.8"))
        );
    }

    #[test]
    fn policy_serde_roundtrip() {
        let json = r#"{"allow_private_networks":false,"allow_cidrs":["10.0.0.0/8","fd00::/8"]}"#;
        let p: UrlPolicy = serde_json::from_str(json).unwrap();
        assert_eq!(p.allow_cidrs.len(), 2);
        assert_eq!(p.max_url_len, 2048);
        let back = serde_json::to_string(&p).unwrap();
        assert!(back.contains("\"10.0.0.0/8\""));
        assert!(serde_json::from_str::<UrlPolicy>(r#"{"bogus":1}"#).is_err());
        assert!(serde_json::from_str::<UrlPolicy>(r#"{"allow_cidrs":["x"]}"#).is_err());
    }

    #[test]
    fn allow_private_keeps_metadata_closed() {
        let p = UrlPolicy::permissive();
        assert!(p.check_url("http://127.0.0.1:8080/x").is_ok());
        assert!(p.check_url("http://10.0.0.1/x").is_ok());
        for u in [
            "http://169.254.169.254/latest/meta-data/",
            "http://[::ffff:169.254.169.254]/",
            "http://[fd00:ec2::254]/",
            "http://[64:ff9b::a9fe:a9fe]/",
        ] {
            assert!(
                matches!(p.check_url(u), Err(GuardError::AddressNotAllowed { .. })),
                "{u}"
            );
        }
        let open = UrlPolicy {
            allow_cidrs: vec!["169.254.169.254/32".parse().unwrap()],
            ..UrlPolicy::permissive()
        };
        assert!(open.check_url("http://169.254.169.254/").is_ok());
    }

    #[test]
    fn allow_cidrs_open_exact_ranges_only() {
        let p = UrlPolicy {
            allow_cidrs: vec!["127.0.0.2/32".parse().unwrap()],
            allowed_ports: Vec::new(),
            ..UrlPolicy::default()
        };
        assert!(p.check_url("http://127.0.0.2:9000/").is_ok());
        assert!(p.check_url("http://127.0.0.1:9000/").is_err());
        assert!(p.check_url("http://[::ffff:127.0.0.2]:9000/").is_ok());
    }

    #[test]
    fn codes() {
        let p = UrlPolicy::default();
        for u in [
            "file:///etc/passwd",
            "ftp://example.com/a",
            "example.com/a.mp4",
            "http://user:pw@example.com/",
            "http://127.0.0.1/",
        ] {
            let e = p.check_url(u).unwrap_err();
            assert_eq!(e.code(), CODE_URL_NOT_ALLOWED, "{u}: {e}");
            assert!(e.is_policy_refusal());
        }
        assert_eq!(
            GuardError::TooManyRedirects { max: 3 }.code(),
            "download_failed"
        );
        assert_eq!(
            GuardError::ResolveFailed {
                host: "x".into(),
                reason: "y".into()
            }
            .code(),
            "download_failed"
        );
    }

    #[test]
    fn metadata_addresses_are_refused_in_every_mode() {
        for p in [UrlPolicy::default(), UrlPolicy::permissive()] {
            for u in [
                "http://168.63.129.16/machine",
                "http://[::ffff:168.63.129.16]/",
                "http://[64:ff9b::a83f:8110]/",
                "http://169.254.170.2/v2/credentials",
                "http://100.100.100.200/latest/meta-data/",
                "http://[fd20:ce::254]/",
                "http://169.254.169.254/",
            ] {
                match p.check_url(u) {
                    Err(GuardError::AddressNotAllowed { reason, .. }) => {
                        assert_eq!(reason, "cloud metadata endpoint", "{u}")
                    }
                    other => panic!("{u}: {other:?}"),
                }
            }
        }
        // allow_cidrs is the only way in.
        let open = UrlPolicy {
            allow_cidrs: vec!["168.63.129.16/32".parse().unwrap()],
            ..UrlPolicy::default()
        };
        assert!(open.check_url("http://168.63.129.16/").is_ok());
    }

    #[test]
    fn ports_are_checked_against_the_allow_list() {
        let p = UrlPolicy::default();
        assert!(p.check_url("http://93.184.216.34/a").is_ok());
        assert!(p.check_url("https://93.184.216.34:443/a").is_ok());
        assert!(p.check_url("http://example.com:80/a").is_ok());
        for u in [
            "http://93.184.216.34:6379/",
            "https://example.com:8443/a",
            "http://example.com:22/",
        ] {
            let e = p.check_url(u).unwrap_err();
            assert!(matches!(e, GuardError::PortNotAllowed { .. }), "{u}: {e:?}");
            assert_eq!(e.code(), CODE_URL_NOT_ALLOWED);
        }
        let extra = UrlPolicy {
            allowed_ports: vec![80, 443, 8443],
            ..UrlPolicy::default()
        };
        assert!(extra.check_url("https://example.com:8443/a").is_ok());
        let any = UrlPolicy {
            allowed_ports: Vec::new(),
            ..UrlPolicy::default()
        };
        assert!(any.check_url("https://example.com:8443/a").is_ok());
        assert!(
            UrlPolicy::permissive()
                .check_url("http://127.0.0.1:9000/")
                .is_ok()
        );
    }

    #[test]
    fn configured_nat64_prefixes_embed_ipv4() {
        let settings = |nat64: &[String]| {
            UrlPolicy::from_settings(&PolicySettings {
                section: "fetch",
                allow_private_networks: false,
                allow_cidrs: &[],
                allowed_ports: &DEFAULT_PORTS,
                nat64_prefixes: nat64,
                max_url_len: 2048,
            })
        };
        let p = settings(&["2001:db8:64::/96".into(), WELL_KNOWN_NAT64.into()]).unwrap();
        // 2001:db8:64::7f00:1 = NAT64 of 127.0.0.1 under the configured prefix.
        match p.check_url("http://[2001:db8:64::7f00:1]/") {
            Err(GuardError::AddressNotAllowed { reason, .. }) => {
                assert!(reason.starts_with("NAT64"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert!(p.ip_refusal(ip("64:ff9b::a9fe:a9fe")).is_some());
        // A public IPv4 behind the configured prefix is still refused here only because
        // 2001:db8::/32 is documentation space; a public prefix passes through.
        let q = settings(&["2a00:1098:2c::/96".into()]).unwrap();
        assert_eq!(q.ip_refusal(ip("2a00:1098:2c::808:808")), None);
        assert!(q.ip_refusal(ip("2a00:1098:2c::a00:1")).is_some());
        assert!(q.ip_refusal(ip("2a00:1098:2c::a83f:8110")).is_some());
        assert!(settings(&["2001:db8::/64".into()]).is_err());
        assert!(settings(&["10.0.0.0/8".into()]).is_err());
    }

    #[test]
    fn refusals_of_host_names_do_not_show_the_resolved_address() {
        let e = GuardError::AddressNotAllowed {
            host: "internal.example".into(),
            ip: ip("10.1.2.3"),
            reason: "private network",
            resolved: true,
        };
        let msg = e.to_string();
        assert!(!msg.contains("10.1.2.3"), "{msg}");
        assert!(msg.contains("internal.example"), "{msg}");
        let lit = UrlPolicy::default()
            .check_url("http://10.1.2.3/")
            .unwrap_err();
        assert!(lit.to_string().contains("10.1.2.3"), "{lit}");
    }

    #[test]
    fn settings_name_the_bad_key() {
        let e = UrlPolicy::from_settings(&PolicySettings {
            section: "gateway.webhook",
            allow_private_networks: false,
            allow_cidrs: &["nope".into()],
            allowed_ports: &DEFAULT_PORTS,
            nat64_prefixes: &[],
            max_url_len: 2048,
        })
        .unwrap_err();
        assert!(e.starts_with("gateway.webhook_allow_cidrs"), "{e}");
    }
}
