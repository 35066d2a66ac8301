//! `lipsync`: command-line client of the lipsync gateway (see the library docs).
//!
//! Run with `lipsync --help`, e.g.
//! `lipsync submit --video face.mp4 --audio speech.wav --out result.mp4`.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = lipsync_client::Cli::parse();
    let mut stdout = std::io::stdout();
    let code = match lipsync_client::run(cli, &mut stdout).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    };
    std::process::exit(code);
}
