//! A progress post edited in place while something slow happens (cloning, starting the
//! container), ending as ready or as what failed and what to do.
//!
//! Each step rewrites the whole post as a checklist, so the thread shows one tidy message
//! instead of a trail of status lines:
//!
//! ```text
//! ✅ Cloning acme/widgets
//! ⏳ Starting the container…
//! ```
//!
//! What is shown is made inert ([`super::render::neutralize`]): an error quotes what the
//! repository's configuration or build said, which must notify nobody and fetch nothing.

use std::sync::Arc;

use tracing::warn;

use super::{ChatOutbound, PostRef};

/// A progress post and the steps shown in it.
pub struct Progress {
    chat: Arc<dyn ChatOutbound>,
    post: PostRef,
    /// Steps begun, in order, each with the notes added while it ran.
    done: Vec<(String, Vec<String>)>,
}

impl Progress {
    /// Takes over an existing post (the dispatcher posts the first line).
    pub fn new(chat: Arc<dyn ChatOutbound>, post: PostRef) -> Self {
        Self {
            chat,
            post,
            done: Vec::new(),
        }
    }

    /// The post being edited.
    pub fn post(&self) -> &PostRef {
        &self.post
    }

    /// Shows `step` as under way (the previous step, if any, as done).
    pub async fn step(&mut self, step: &str) {
        let text = self.render(&format!("⏳ {step}…"));
        self.done.push((step.to_owned(), Vec::new()));
        self.show(text).await;
    }

    /// Adds a line under the step under way (e.g. what was left out of a configuration). It
    /// shows with the next update of the post.
    pub fn note(&mut self, line: &str) {
        if let Some((_, notes)) = self.done.last_mut() {
            notes.push(line.to_owned());
        }
    }

    /// Ends with success: every step done, then `message`.
    pub async fn ready(&mut self, message: &str) {
        let text = self.render(&format!("🟢 {message}"));
        self.show(text).await;
    }

    /// Ends with a failure of the step under way: what failed, the error, and what to do.
    pub async fn failed(&mut self, error: &str, what_to_do: &str) {
        let (failed_step, notes) = self
            .done
            .pop()
            .unwrap_or_else(|| ("Starting".to_owned(), Vec::new()));
        let mut last = format!("❌ {failed_step} failed: {error}");
        for note in notes {
            last.push_str(&format!("\n    {note}"));
        }
        last.push_str(&format!("\n\n**What to do:** {what_to_do}"));
        let text = self.render(&last);
        self.show(text).await;
    }

    /// Done steps, then `last`.
    fn render(&self, last: &str) -> String {
        let mut lines = Vec::new();
        for (step, notes) in &self.done {
            lines.push(format!("✅ {step}"));
            lines.extend(notes.iter().map(|n| format!("    {n}")));
        }
        lines.push(last.to_owned());
        lines.join("\n")
    }

    /// Posts `text` made inert ([`super::render::neutralize`]): errors and notes quote what a
    /// repository or the VM said, which may carry mentions and images.
    async fn show(&self, text: String) {
        let text = super::render::neutralize(&text);
        if let Err(e) = self.chat.update(&self.post, &text).await {
            warn!(error = %e, "cannot update the progress post");
        }
    }
}
