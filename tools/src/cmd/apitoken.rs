//! `tidemark api-token`: tokens with roles for the collector's API
//! (`docs/security.md`, "The API"). The collector's `--api-tokens FILE`
//! keeps only each secret's blake3; the secret goes to a 0600 file for
//! its holder. The collector reads the file again when it changes.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use tidemark_net::apitokens::{check_name, hash_secret, parse, ApiRole, ApiToken};

#[derive(Subcommand)]
pub enum ApiTokenCmd {
    /// Make a token: its secret to --out (0600), its hash to --file.
    #[command(
        override_usage = "tidemark api-token add --file FILE NAME --role viewer|operator|admin --out SECRET_FILE",
        after_help = "Example:\n  tidemark api-token add --file /etc/tidemark/api-tokens alice --role operator --out ~/.tidemark/api-token\n  \
                      tidemark-collector ... --api-tokens /etc/tidemark/api-tokens\n\n\
                      Roles: a viewer reads everything (disk UUIDs too); an operator also quiesces, tags, drills and \
                      fails over; an admin also rebinds disks."
    )]
    Add(AddArgs),
    /// List the tokens of a file (names and roles; secrets are not kept).
    List(FileArgs),
    /// Remove a token: its holder is refused from the next request.
    Remove(RemoveArgs),
}

#[derive(Args)]
pub struct FileArgs {
    /// The collector's --api-tokens file.
    #[arg(long)]
    file: PathBuf,
}

#[derive(Args)]
pub struct AddArgs {
    #[command(flatten)]
    f: FileArgs,
    /// The token's name (the audit log's "who").
    name: String,
    /// viewer, operator or admin.
    #[arg(long)]
    role: String,
    /// Where the secret goes (created 0600; must not exist).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct RemoveArgs {
    #[command(flatten)]
    f: FileArgs,
    /// The token's name.
    name: String,
}

pub fn run(c: ApiTokenCmd) -> Result<()> {
    match c {
        ApiTokenCmd::Add(a) => add(&a),
        ApiTokenCmd::List(a) => {
            for t in read(&a.file)? {
                outln!("{:<24} {}", t.name, t.role);
            }
            Ok(())
        }
        ApiTokenCmd::Remove(a) => {
            let tokens = read(&a.f.file)?;
            if !tokens.iter().any(|t| t.name == a.name) {
                anyhow::bail!("{}: no token named {:?}", a.f.file.display(), a.name);
            }
            let text: String = tokens.iter().filter(|t| t.name != a.name).map(ApiToken::line).collect();
            tidemark_net::tls::write_private(&a.f.file, text.as_bytes()).map_err(anyhow::Error::msg)?;
            outln!("removed token {} from {}", a.name, a.f.file.display());
            Ok(())
        }
    }
}

/// The tokens of `path` (none if it does not exist yet).
fn read(path: &Path) -> Result<Vec<ApiToken>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            tidemark_net::tls::private_file(path).map_err(anyhow::Error::msg)?;
            parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

fn add(a: &AddArgs) -> Result<()> {
    check_name(&a.name).map_err(anyhow::Error::msg)?;
    let role = ApiRole::parse(&a.role).with_context(|| format!("--role {:?}: viewer, operator or admin", a.role))?;
    let mut tokens = read(&a.f.file)?;
    if tokens.iter().any(|t| t.name == a.name) {
        anyhow::bail!(
            "{}: a token named {:?} exists (tidemark api-token remove it first)",
            a.f.file.display(),
            a.name
        );
    }
    let secret = tidemark_net::apitokens::new_secret();
    // The secret first (create_new: never over another file), then the hash.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&a.out)
        .with_context(|| format!("--out {}", a.out.display()))?;
    f.write_all(format!("{secret}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("write {}", a.out.display()))?;
    tokens.push(ApiToken {
        name: a.name.clone(),
        role,
        hash: hash_secret(secret.as_bytes()),
    });
    let text: String = tokens.iter().map(ApiToken::line).collect();
    if let Err(e) = tidemark_net::tls::write_private(&a.f.file, text.as_bytes()) {
        let _ = std::fs::remove_file(&a.out);
        anyhow::bail!("{e}");
    }
    outln!(
        "token {} ({role}) added to {}; its secret is in {} (send it as Authorization: Bearer, or --token-file)",
        a.name,
        a.f.file.display(),
        a.out.display()
    );
    Ok(())
}
