//! The client verbs of `dispatch`, as Dispatch's CLI had them: `create` (one object, or
//! every document of a YAML file), `get` (tables, or `-o json`), `exec` (a run) and
//! `delete`. Each verb resolves where the gateway is, makes its calls through
//! [`Client`], prints what a user needs and returns the exit code: 0 when everything
//! asked for was done, 1 otherwise (after reporting every object that failed).

/// `print!`/`println!` that end the process quietly when stdout is closed early
/// (`dispatch get runs | head`), as Unix tools do, instead of panicking.
macro_rules! print {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            panic!("writing to stdout: {e}");
        }
    }};
}

macro_rules! println {
    ($($arg:tt)*) => {{
        print!("{}\n", format_args!($($arg)*));
    }};
}

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use http::Method;
use serde_json::{Map, Value, json};

use super::http::{CliError, Client, ConnArgs, Settings};
use super::manifest::{self, Document, Kind, encode_segment};
use super::output::{Table, cell, pretty, time};

/// How often a waiting `create` asks for a function's status.
const POLL: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns.
    #[default]
    Table,
    /// The gateway's JSON, pretty-printed.
    Json,
}

#[derive(Args, Debug)]
pub struct OutputArgs {
    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        global = true,
        value_enum,
        default_value_t
    )]
    output: Format,
}

#[derive(Args, Debug)]
pub struct WaitArgs {
    /// Do not wait for created functions to become READY.
    #[arg(long, global = true)]
    no_wait: bool,
    /// How long to wait for a created function to become READY, in seconds.
    #[arg(long, global = true, default_value_t = 300, value_name = "SECONDS")]
    wait_timeout: u64,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    #[command(subcommand)]
    what: Option<CreateWhat>,
    /// A YAML file of objects to create, one document each (Dispatch's seed format).
    #[arg(short, long)]
    file: Option<PathBuf>,
    /// Report objects that exist already and go on, without counting them as errors.
    #[arg(long, global = true)]
    skip_existing: bool,
    #[command(flatten)]
    wait: WaitArgs,
    #[command(flatten)]
    out: OutputArgs,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Subcommand, Debug)]
enum CreateWhat {
    /// Create a function from source (a file or directory), or on given endpoints.
    #[command(alias = "fn")]
    Function {
        name: String,
        /// The function's code: a file or a directory, sent as a tar.gz.
        path: Option<PathBuf>,
        /// The image to run it on (e.g. python3, nodejs).
        #[arg(long)]
        image: Option<String>,
        /// FILE.FUNCTION, e.g. hello.handle.
        #[arg(long)]
        handler: Option<String>,
        /// A secret the function reads (repeatable).
        #[arg(long = "secret")]
        secrets: Vec<String>,
        /// Deadline of one run, in milliseconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// An URL where the function already runs: the static driver (repeatable).
        #[arg(long = "endpoint")]
        endpoints: Vec<String>,
        /// What the endpoints speak: dispatch (the pod contract) or raw.
        #[arg(long, requires = "endpoints")]
        protocol: Option<String>,
    },
    /// Create a secret from a JSON file of names and values, or from --value k=v.
    Secret {
        name: String,
        file: Option<PathBuf>,
        /// One KEY=VALUE (repeatable).
        #[arg(long = "value")]
        values: Vec<String>,
    },
    /// Create an image on a base image.
    Image { name: String, base_image: String },
    /// Create a base image from a container image URL.
    #[command(name = "base-image", alias = "baseimage")]
    BaseImage {
        name: String,
        url: String,
        #[arg(long)]
        language: String,
    },
    /// Create a subscription: events of a type start async runs of a function.
    Subscription {
        name: String,
        function: String,
        /// The event type (e.g. user.created; * for every event).
        #[arg(long)]
        event_type: String,
        /// A secret the runs get (repeatable).
        #[arg(long = "secret")]
        secrets: Vec<String>,
    },
    /// Create an API endpoint that runs a function.
    Api {
        name: String,
        function: String,
        /// HTTP method (repeatable) [default: GET].
        #[arg(long = "method")]
        methods: Vec<String>,
        /// Path (repeatable) [default: /NAME].
        #[arg(long = "path")]
        paths: Vec<String>,
        /// Host name the API answers for (repeatable; Dispatch's --domain: --host names
        /// the gateway).
        #[arg(long = "domain")]
        hosts: Vec<String>,
        /// Serve over https only.
        #[arg(long)]
        https_only: bool,
        /// Answer CORS requests.
        #[arg(long)]
        cors: bool,
        /// Who may call it: public or bearer.
        #[arg(long, default_value = "public")]
        auth: String,
    },
}

/// What `get` and `delete` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Resource {
    #[value(alias = "function", alias = "fn")]
    Functions,
    #[value(alias = "run")]
    Runs,
    #[value(alias = "image")]
    Images,
    #[value(
        name = "base-images",
        alias = "base-image",
        alias = "baseimages",
        alias = "baseimage"
    )]
    BaseImages,
    #[value(alias = "secret")]
    Secrets,
    #[value(alias = "api")]
    Apis,
    #[value(alias = "subscription")]
    Subscriptions,
}

impl Resource {
    fn kind(self) -> Option<Kind> {
        match self {
            Resource::Functions => Some(Kind::Function),
            Resource::Runs => None,
            Resource::Images => Some(Kind::Image),
            Resource::BaseImages => Some(Kind::BaseImage),
            Resource::Secrets => Some(Kind::Secret),
            Resource::Apis => Some(Kind::Api),
            Resource::Subscriptions => Some(Kind::Subscription),
        }
    }
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// What to list.
    #[arg(value_enum)]
    what: Resource,
    /// One object by name; for runs, the function whose runs to list.
    name: Option<String>,
    /// For runs: one run of that function, by its id.
    run: Option<String>,
    /// For runs: how many per page (the gateway's default is 100, its most 1000).
    #[arg(long)]
    limit: Option<u32>,
    /// For runs: follow the gateway's pages (X-Next-Cursor) to the end.
    #[arg(long)]
    all: bool,
    /// For runs: the async runs that ended ERROR and wait with the dead letters
    /// (`dispatch retry RUN` sends one again).
    #[arg(long)]
    dead: bool,
    #[command(flatten)]
    out: OutputArgs,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// The function to run.
    name: String,
    /// The input, as JSON.
    #[arg(long)]
    input: Option<String>,
    /// Wait for the run to finish and print it (a blocking run).
    #[arg(long)]
    wait: bool,
    /// A secret to pass to this run (repeatable).
    #[arg(long = "secret")]
    secrets: Vec<String>,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Args, Debug)]
pub struct EmitArgs {
    /// The event type, e.g. user.created.
    event_type: String,
    /// The event's data, as JSON.
    #[arg(long)]
    payload: Option<String>,
    /// Where the event comes from (its source-type).
    #[arg(long, default_value = "dispatch")]
    source: String,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Args, Debug)]
pub struct RetryArgs {
    /// The run to send again (an async run that ended ERROR, from `get runs --dead`).
    run: String,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// What to delete.
    #[arg(value_enum, required_unless_present = "file")]
    what: Option<Resource>,
    /// Its name.
    #[arg(required_unless_present = "file")]
    name: Option<String>,
    /// Delete every object of a YAML file, in reverse dependency order.
    #[arg(short, long, conflicts_with_all = ["what", "name"])]
    file: Option<PathBuf>,
    #[command(flatten)]
    out: OutputArgs,
    #[command(flatten)]
    conn: ConnArgs,
}

/// Runs a verb: connects, does it, and turns its outcome into an exit code.
fn run(conn: &ConnArgs, verb: impl FnOnce(&Client) -> Result<ExitCode, CliError>) -> ExitCode {
    let outcome = Settings::load(conn)
        .and_then(Client::new)
        .and_then(|client| verb(&client));
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn exit(failed: bool) -> ExitCode {
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

// ---------------------------------------------------------------------------------------
// create
// ---------------------------------------------------------------------------------------

pub fn create(args: CreateArgs) -> ExitCode {
    run(&args.conn, |client| match (&args.file, &args.what) {
        (Some(file), None) => create_file(client, file, &args),
        (None, Some(what)) => {
            let (kind, body) = object_of(what)?;
            let mut creator = Creator::new(client, &args);
            let name = body["name"].as_str().unwrap_or_default().to_string();
            let created = match creator.create(&kind, &name, &body) {
                // `--host` names the gateway, for `create api` too (as in Dispatch's CLI);
                // someone who meant the API's host name is told which flag that is.
                Err(CliError::Connect { url, cause })
                    if matches!(what, CreateWhat::Api { .. }) && args.conn.host.is_some() =>
                {
                    return Err(CliError::Connect {
                        url,
                        cause: format!(
                            "{cause}; --host names the gateway, the API's own host name is \
                             --domain"
                        ),
                    });
                }
                other => other?,
            };
            creator.flush_waits()?;
            if args.out.output == Format::Json {
                println!("{}", pretty(&created.unwrap_or(Value::Null)));
            }
            Ok(exit(creator.failed))
        }
        (Some(_), Some(_)) => Err(CliError::Usage(
            "create: give either --file or what to create, not both".into(),
        )),
        (None, None) => Err(CliError::Usage(
            "create: give --file FILE.yaml, or what to create (see dispatch create --help)".into(),
        )),
    })
}

fn create_file(client: &Client, file: &Path, args: &CreateArgs) -> Result<ExitCode, CliError> {
    let docs = manifest::load(file)?;
    let mut creator = Creator::new(client, args);
    let mut created = Vec::new();
    for doc in &docs {
        if doc.kind > Kind::Function {
            // Functions first become READY, then what calls them is created.
            creator.flush_waits()?;
        }
        if let Some(object) = creator.create(&doc.kind, &doc.name, &doc.body)? {
            created.push(object);
        }
    }
    creator.flush_waits()?;
    if args.out.output == Format::Json {
        println!("{}", pretty(&Value::Array(created)));
    }
    Ok(exit(creator.failed))
}

/// Creates objects one after the other, reporting each; remembers functions still being
/// built so that they are waited for together.
struct Creator<'a> {
    client: &'a Client,
    skip_existing: bool,
    wait: Option<Duration>,
    quiet: bool,
    pending: Vec<String>,
    failed: bool,
}

impl<'a> Creator<'a> {
    fn new(client: &'a Client, args: &CreateArgs) -> Creator<'a> {
        Creator {
            client,
            skip_existing: args.skip_existing,
            wait: (!args.wait.no_wait).then(|| Duration::from_secs(args.wait.wait_timeout)),
            quiet: args.out.output == Format::Json,
            pending: Vec::new(),
            failed: false,
        }
    }

    /// Creates one object and reports it. An error of the gateway is reported and counted;
    /// only an unreachable gateway (or the like) stops everything.
    fn create(&mut self, kind: &Kind, name: &str, body: &Value) -> Result<Option<Value>, CliError> {
        let Some(path) = kind.collection() else {
            eprintln!(
                "skipped {} \"{name}\": kind not known to this CLI",
                kind.name()
            );
            self.failed = true;
            return Ok(None);
        };
        match self.client.call(Method::POST, path, Some(body)) {
            Ok(reply) => {
                let created = if reply.body.is_empty() {
                    body.clone()
                } else {
                    reply.json()?
                };
                if !self.quiet {
                    println!("Created {}: {name}", kind.name());
                }
                if *kind == Kind::Function && self.wait.is_some() && !is_ready(&created) {
                    self.pending.push(name.to_string());
                }
                Ok(Some(created))
            }
            Err(e) if e.code() == Some(409) && self.skip_existing => {
                eprintln!("{} \"{name}\" exists already: left as it is", kind.name());
                Ok(None)
            }
            Err(e) if e.code() == Some(404) && !served(self.client, kind)? => {
                eprintln!(
                    "skipped {} \"{name}\": not served by this gateway ({e})",
                    kind.name()
                );
                self.failed = true;
                Ok(None)
            }
            Err(e @ CliError::Api { .. }) => {
                eprintln!("{} \"{name}\": {e}", kind.name());
                self.failed = true;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Waits for the functions created since the last flush to become READY.
    fn flush_waits(&mut self) -> Result<(), CliError> {
        let Some(timeout) = self.wait else {
            return Ok(());
        };
        for name in std::mem::take(&mut self.pending) {
            if !wait_ready(self.client, &name, timeout)? {
                self.failed = true;
            }
        }
        Ok(())
    }
}

fn is_ready(function: &Value) -> bool {
    !matches!(
        function["status"].as_str(),
        Some("INITIALIZED" | "CREATING" | "UPDATING")
    )
}

/// Whether the gateway serves `kind` at all: a 404 on its collection says it does not
/// (as opposed to a 404 about one object, or about one the object refers to).
fn served(client: &Client, kind: &Kind) -> Result<bool, CliError> {
    let Some(path) = kind.collection() else {
        return Ok(false);
    };
    Ok(client.send(Method::GET, path, None)?.status.as_u16() != 404)
}

/// Polls a function until it is READY (true), ERROR or still building after `timeout`
/// (false), showing progress on stderr.
fn wait_ready(client: &Client, name: &str, timeout: Duration) -> Result<bool, CliError> {
    let path = Kind::Function.item(name).expect("functions have paths");
    let give_up = Instant::now() + timeout;
    eprint!("Waiting for function {name} to become READY...");
    loop {
        let function = match client.call(Method::GET, &path, None) {
            Ok(reply) => reply.json()?,
            Err(e) => {
                eprintln!(" {e}");
                return Ok(false);
            }
        };
        let status = function["status"].as_str().unwrap_or("UNKNOWN");
        match status {
            "READY" => {
                eprintln!(" READY");
                return Ok(true);
            }
            "INITIALIZED" | "CREATING" | "UPDATING" => {}
            _ => {
                let reason = cell(&function, "reason");
                let reason = if reason.is_empty() {
                    "no reason given".to_string()
                } else {
                    reason.replace(',', "; ")
                };
                eprintln!(" {status}: {reason}");
                return Ok(false);
            }
        }
        if Instant::now() >= give_up {
            eprintln!(
                " still {status} after {}s (--wait-timeout)",
                timeout.as_secs()
            );
            return Ok(false);
        }
        std::thread::sleep(POLL);
    }
}

/// The kind and body of an object given on the command line.
fn object_of(what: &CreateWhat) -> Result<(Kind, Value), CliError> {
    Ok(match what {
        CreateWhat::Function {
            name,
            path,
            image,
            handler,
            secrets,
            timeout,
            endpoints,
            protocol,
        } => {
            if path.is_none() && endpoints.is_empty() {
                return Err(CliError::Usage(format!(
                    "create function {name}: give the PATH of its code, or --endpoint URL where it runs"
                )));
            }
            let mut body = Map::new();
            body.insert("name".into(), json!(name));
            if let Some(path) = path {
                let source = super::source::encode(path)
                    .map_err(|e| CliError::Usage(format!("reading {}: {e}", path.display())))?;
                body.insert("source".into(), json!(source));
            }
            if let Some(image) = image {
                body.insert("image".into(), json!(image));
            }
            if let Some(handler) = handler {
                body.insert("handler".into(), json!(handler));
            }
            if !secrets.is_empty() {
                body.insert("secrets".into(), json!(secrets));
            }
            if let Some(timeout) = timeout {
                body.insert("timeout".into(), json!(timeout));
            }
            if !endpoints.is_empty() {
                let mut upstream = json!({"driver": "static", "endpoints": endpoints});
                if let Some(protocol) = protocol {
                    upstream["protocol"] = json!(protocol);
                }
                body.insert("upstream".into(), upstream);
            }
            (Kind::Function, Value::Object(body))
        }
        CreateWhat::Secret { name, file, values } => {
            let mut secrets = match file {
                Some(file) => {
                    let text = std::fs::read_to_string(file)
                        .map_err(|e| CliError::Usage(format!("reading {}: {e}", file.display())))?;
                    match serde_json::from_str::<Value>(&text) {
                        Ok(Value::Object(map)) => map,
                        _ => {
                            return Err(CliError::Usage(format!(
                                "{}: must be a JSON object of names and values",
                                file.display()
                            )));
                        }
                    }
                }
                None => Map::new(),
            };
            for pair in values {
                let (k, v) = pair
                    .split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| {
                        CliError::Usage(format!("--value \"{pair}\": must be KEY=VALUE"))
                    })?;
                secrets.insert(k.to_string(), json!(v));
            }
            if secrets.is_empty() {
                return Err(CliError::Usage(format!(
                    "create secret {name}: give a FILE.json or --value KEY=VALUE"
                )));
            }
            (Kind::Secret, json!({"name": name, "secrets": secrets}))
        }
        CreateWhat::Subscription {
            name,
            function,
            event_type,
            secrets,
        } => (
            Kind::Subscription,
            json!({"name": name, "function": function, "eventType": event_type, "secrets": secrets}),
        ),
        CreateWhat::Image { name, base_image } => (
            Kind::Image,
            json!({"name": name, "baseImageName": base_image}),
        ),
        CreateWhat::BaseImage {
            name,
            url,
            language,
        } => (
            Kind::BaseImage,
            json!({"name": name, "dockerUrl": url, "language": language}),
        ),
        CreateWhat::Api {
            name,
            function,
            methods,
            paths,
            hosts,
            https_only,
            cors,
            auth,
        } => {
            if auth != "public" && auth != "bearer" {
                return Err(CliError::Usage(format!(
                    "--auth \"{auth}\": must be public or bearer"
                )));
            }
            let methods = if methods.is_empty() {
                vec!["GET".to_string()]
            } else {
                methods.iter().map(|m| m.to_uppercase()).collect()
            };
            let uris = if paths.is_empty() {
                vec![format!("/{name}")]
            } else {
                paths.clone()
            };
            let protocols: &[&str] = if *https_only {
                &["https"]
            } else {
                &["http", "https"]
            };
            (
                Kind::Api,
                json!({
                    "name": name,
                    "function": function,
                    "methods": methods,
                    "uris": uris,
                    "hosts": hosts,
                    "protocols": protocols,
                    "cors": cors,
                    "authentication": auth,
                    "enabled": true,
                }),
            )
        }
    })
}

// ---------------------------------------------------------------------------------------
// get
// ---------------------------------------------------------------------------------------

pub fn get(args: GetArgs) -> ExitCode {
    run(&args.conn, |client| {
        if args.what == Resource::Runs {
            return get_runs(client, &args);
        }
        if args.run.is_some() || args.limit.is_some() || args.all {
            return Err(CliError::Usage(
                "a run id, --limit and --all are for `get runs` only".into(),
            ));
        }
        let kind = args.what.kind().expect("runs handled above");
        let objects = match &args.name {
            Some(name) => {
                let path = kind.item(name).expect("known kinds have paths");
                vec![client.call(Method::GET, &path, None)?.json()?]
            }
            None => {
                let path = kind.collection().expect("known kinds have paths");
                list(client, &kind, path)?
            }
        };
        match args.out.output {
            Format::Json if args.name.is_some() => println!("{}", pretty(&objects[0])),
            Format::Json => println!("{}", pretty(&Value::Array(objects))),
            Format::Table => print!("{}", table(&kind, &objects).render()),
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// A collection, as a list; a 404 on it says that this gateway does not serve the kind.
fn list(client: &Client, kind: &Kind, path: &str) -> Result<Vec<Value>, CliError> {
    let reply = client.call(Method::GET, path, None).map_err(|e| match e {
        CliError::Api { code: 404, message } => CliError::Api {
            code: 404,
            message: format!("{message} (this gateway does not serve {}s)", kind.noun()),
        },
        e => e,
    })?;
    match reply.json()? {
        Value::Array(items) => Ok(items),
        other => Err(CliError::Other(format!(
            "GET {path}: expected a list, got {other}"
        ))),
    }
}

fn table(kind: &Kind, objects: &[Value]) -> Table {
    let created = |o: &Value| time(o["createdTime"].as_i64().unwrap_or(0));
    match kind {
        Kind::Function => {
            let mut t = Table::new(&["Name", "Image", "Status", "Created Date"]);
            for f in objects {
                t.row(vec![
                    cell(f, "name"),
                    cell(f, "image"),
                    cell(f, "status"),
                    created(f),
                ]);
            }
            t
        }
        Kind::Image => {
            let mut t = Table::new(&["Name", "URL", "BaseImage", "Status", "Created Date"]);
            for i in objects {
                t.row(vec![
                    cell(i, "name"),
                    cell(i, "dockerUrl"),
                    cell(i, "baseImageName"),
                    cell(i, "status"),
                    created(i),
                ]);
            }
            t
        }
        Kind::BaseImage => {
            let mut t = Table::new(&["Name", "URL", "Language", "Status", "Created Date"]);
            for i in objects {
                t.row(vec![
                    cell(i, "name"),
                    cell(i, "dockerUrl"),
                    cell(i, "language"),
                    cell(i, "status"),
                    created(i),
                ]);
            }
            t
        }
        Kind::Secret => {
            // Values stay out of tables; -o json shows what the gateway chose to show.
            let mut t = Table::new(&["Name", "Keys"]);
            for s in objects {
                let keys = s["secrets"]
                    .as_object()
                    .map(|m| m.keys().cloned().collect::<Vec<_>>().join(","))
                    .unwrap_or_default();
                t.row(vec![cell(s, "name"), keys]);
            }
            t
        }
        Kind::Api => {
            let mut t = Table::new(&[
                "Name", "Function", "Protocol", "Method", "Domain", "Path", "Auth", "Status",
                "Enabled",
            ]);
            for a in objects {
                t.row(vec![
                    cell(a, "name"),
                    cell(a, "function"),
                    cell(a, "protocols"),
                    cell(a, "methods"),
                    cell(a, "hosts"),
                    cell(a, "uris"),
                    cell(a, "authentication"),
                    cell(a, "status"),
                    cell(a, "enabled"),
                ]);
            }
            t
        }
        Kind::Subscription | Kind::Unknown(_) => {
            let mut t = Table::new(&["Name", "Event Type", "Function", "Status", "Created Date"]);
            for s in objects {
                t.row(vec![
                    cell(s, "name"),
                    cell(s, "eventType"),
                    cell(s, "function"),
                    cell(s, "status"),
                    created(s),
                ]);
            }
            t
        }
    }
}

fn get_runs(client: &Client, args: &GetArgs) -> Result<ExitCode, CliError> {
    let function_query = args
        .name
        .as_ref()
        .map(|f| format!("functionName={}", encode_segment(f)));
    if let Some(run) = &args.run {
        let mut path = format!("/v1/runs/{}", encode_segment(run));
        if let Some(q) = &function_query {
            path = format!("{path}?{q}");
        }
        let run = client.call(Method::GET, &path, None)?.json()?;
        match args.out.output {
            Format::Json => println!("{}", pretty(&run)),
            Format::Table => print!("{}", runs_table(std::slice::from_ref(&run)).render()),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut runs = Vec::new();
    let mut cursor: Option<String> = None;
    let more = loop {
        let mut query: Vec<String> = function_query.iter().cloned().collect();
        if args.dead {
            query.push("dead=true".into());
        }
        if let Some(limit) = args.limit {
            query.push(format!("limit={limit}"));
        }
        if let Some(c) = &cursor {
            query.push(format!("cursor={}", encode_segment(c)));
        }
        let path = if query.is_empty() {
            "/v1/runs".to_string()
        } else {
            format!("/v1/runs?{}", query.join("&"))
        };
        let reply = client.call(Method::GET, &path, None)?;
        match reply.json()? {
            Value::Array(page) => runs.extend(page),
            other => {
                return Err(CliError::Other(format!(
                    "GET {path}: expected a list of runs, got {other}"
                )));
            }
        }
        match reply.header("x-next-cursor") {
            Some(next) if args.all => cursor = Some(next.to_string()),
            next => break next.is_some(),
        }
    };
    match args.out.output {
        Format::Json => println!("{}", pretty(&Value::Array(runs))),
        Format::Table => print!("{}", runs_table(&runs).render()),
    }
    if more {
        eprintln!("(more runs on the next pages: --all lists them all)");
    }
    Ok(ExitCode::SUCCESS)
}

fn runs_table(runs: &[Value]) -> Table {
    let mut t = Table::new(&["ID", "Function", "Status", "Started", "Finished"]);
    for r in runs {
        t.row(vec![
            cell(r, "name"),
            cell(r, "functionName"),
            cell(r, "status"),
            time(r["executedTime"].as_i64().unwrap_or(0)),
            time(r["finishedTime"].as_i64().unwrap_or(0)),
        ]);
    }
    t
}

// ---------------------------------------------------------------------------------------
// exec
// ---------------------------------------------------------------------------------------

pub fn exec(args: ExecArgs) -> ExitCode {
    run(&args.conn, |client| {
        let mut body = json!({"blocking": args.wait});
        if let Some(input) = &args.input {
            let input: Value = serde_json::from_str(input)
                .map_err(|e| CliError::Usage(format!("--input: not JSON: {e}")))?;
            body["input"] = input;
        }
        if !args.secrets.is_empty() {
            body["secrets"] = json!(args.secrets);
        }
        let path = format!("/v1/runs?functionName={}", encode_segment(&args.name));
        let run = client.call(Method::POST, &path, Some(&body))?.json()?;
        println!("{}", pretty(&run));
        Ok(ExitCode::SUCCESS)
    })
}

/// `dispatch emit TYPE --payload JSON`: emits an event (`POST /v1/event/`); every function
/// subscribed to the type gets an async run. Prints the emission, with the runs started.
pub fn emit(args: EmitArgs) -> ExitCode {
    run(&args.conn, |client| {
        let data: Value = match &args.payload {
            None => Value::Null,
            Some(text) => serde_json::from_str(text)
                .map_err(|e| CliError::Usage(format!("--payload: not JSON: {e}")))?,
        };
        let body = json!({"event": {
            "event-type": args.event_type,
            "source-type": args.source,
            "cloud-events-version": "0.1",
            "content-type": "application/json",
            "data": data,
        }});
        let emitted = client
            .call(Method::POST, "/v1/event/", Some(&body))?
            .json()?;
        println!("{}", pretty(&emitted));
        Ok(ExitCode::SUCCESS)
    })
}

/// `dispatch retry RUN`: sends a dead run again (`POST /v1/runs/{run}/retry`) and prints
/// the run as accepted.
pub fn retry(args: RetryArgs) -> ExitCode {
    run(&args.conn, |client| {
        let path = format!("/v1/runs/{}/retry", encode_segment(&args.run));
        let run = client.call(Method::POST, &path, Some(&json!({})))?.json()?;
        println!("{}", pretty(&run));
        Ok(ExitCode::SUCCESS)
    })
}

// ---------------------------------------------------------------------------------------
// delete
// ---------------------------------------------------------------------------------------

pub fn delete(args: DeleteArgs) -> ExitCode {
    run(&args.conn, |client| {
        let quiet = args.out.output == Format::Json;
        if let Some(file) = &args.file {
            let mut docs = manifest::load(file)?;
            docs.reverse();
            let mut failed = false;
            let mut deleted = Vec::new();
            for doc in &docs {
                match delete_one(client, doc, quiet)? {
                    Some(object) => deleted.push(object),
                    None => failed = true,
                }
            }
            if quiet {
                println!("{}", pretty(&Value::Array(deleted)));
            }
            return Ok(exit(failed));
        }
        let (Some(what), Some(name)) = (args.what, &args.name) else {
            return Err(CliError::Usage(
                "delete: give what to delete and its name, or --file FILE.yaml".into(),
            ));
        };
        let Some(kind) = what.kind() else {
            return Err(CliError::Usage("runs cannot be deleted".into()));
        };
        let path = kind.item(name).expect("known kinds have paths");
        let reply = client.call(Method::DELETE, &path, None)?;
        if quiet {
            let shown = if reply.body.is_empty() {
                json!({"name": name})
            } else {
                reply.json()?
            };
            println!("{}", pretty(&shown));
        } else {
            println!("Deleted {}: {name}", kind.noun());
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Deletes one document's object, reporting it; None when it failed (and was reported).
fn delete_one(client: &Client, doc: &Document, quiet: bool) -> Result<Option<Value>, CliError> {
    let (kind, name) = (&doc.kind, &doc.name);
    let Some(path) = kind.item(name) else {
        eprintln!(
            "skipped {} \"{name}\": kind not known to this CLI",
            kind.name()
        );
        return Ok(None);
    };
    match client.call(Method::DELETE, &path, None) {
        Ok(reply) => {
            if !quiet {
                println!("Deleted {}: {name}", kind.name());
            }
            Ok(Some(if reply.body.is_empty() {
                json!({"name": name})
            } else {
                reply.json()?
            }))
        }
        Err(e) if e.code() == Some(404) && !served(client, kind)? => {
            eprintln!(
                "skipped {} \"{name}\": not served by this gateway ({e})",
                kind.name()
            );
            Ok(None)
        }
        Err(e @ CliError::Api { .. }) => {
            eprintln!("{} \"{name}\": {e}", kind.name());
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
