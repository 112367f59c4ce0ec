//! What `rba test` says after cargo's own output: the results per test binary (passed, failed,
//! ignored), the failing tests' output, and a total line.
//!
//! Why: a remote `cargo test` streams hundreds of lines, and the answer a developer wants —
//! which tests failed and why — is scattered among them (one `test result:` line per binary,
//! the failure sections far above the last line). The report is read from the log lines the
//! CLI already prints, the same lines on both paths (the embedded node's log stream and a
//! remote session's `LogBatch`es, live or replayed from the action cache), so there is one
//! parser of cargo's and libtest's text and no second channel of results from the node.
//!
//! What it reads (after removing escape sequences):
//! - cargo's `Running unittests src/lib.rs (target/debug/deps/NAME-HASH)` and `Doc-tests NAME`
//!   name the binary whose results follow;
//! - libtest's `test result: ok. 2 passed; 1 failed; 0 ignored; …` closes that binary;
//! - libtest's `---- NAME stdout ----` opens a failing test's captured output, which runs to
//!   the next such header or to the `failures:` list that follows the sections;
//! - that list (`failures:` then one indented name a line) names every failing test, also
//!   those without a section (`-- --nocapture` prints their output inline, above).

use rba_executor::logstream::strip_ansi;

/// One test binary's counts, from its `test result:` line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BinaryResult {
    /// As cargo names it: `unittests src/lib.rs (mixed_tests)`, `doc-tests mixed_tests`.
    pub name: String,
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed.
    pub failed: u64,
    /// Tests that were ignored.
    pub ignored: u64,
}

/// A failing test and what libtest captured of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FailedTest {
    /// The binary it ran in (the name of its [`BinaryResult`]).
    pub binary: String,
    /// The test's path, `tests::fails_on_purpose`.
    pub test: String,
    /// Its section, header included, blank lines at either end removed.
    pub output: Vec<String>,
}

/// Results gathered from a test job's log, one line at a time.
///
/// Cargo names a binary on its stderr (`Running …`) and the binary reports on its stdout, and
/// the log interleaves the two streams as they arrive: the next binary's `Running` line may
/// come before the previous binary's `test result:`. Each stream is in order, though, and the
/// binaries run one after the other, so the n-th `test result:` (and the failure sections
/// before it) belongs to the n-th binary cargo named; names are matched that way.
#[derive(Clone, Debug, Default)]
pub struct TestReport {
    /// Binaries as cargo named them, in order.
    announced: Vec<String>,
    /// (passed, failed, ignored) of each `test result:` line, in order.
    results: Vec<(u64, u64, u64)>,
    /// Failing tests with the index of the result they precede (their binary's).
    failures: Vec<(usize, FailedTest)>,
    open: Option<FailedTest>,
    in_failure_list: bool,
}

impl TestReport {
    /// Reads one log line (escape sequences allowed).
    pub fn line(&mut self, raw: &str) {
        let plain = strip_ansi(raw);
        let line = plain.trim_end();
        // Cargo's own lines (stderr) may land anywhere in the test binaries' output (stdout),
        // inside a failure section or list too: they are never part of one.
        let status = line.trim_start();
        if let Some(rest) = status.strip_prefix("Running ")
            && !rest.starts_with('`')
        {
            self.announced.push(binary_label(rest));
            return;
        }
        if let Some(rest) = status.strip_prefix("Doc-tests ") {
            self.announced.push(format!("doc-tests {}", rest.trim()));
            return;
        }
        let cargo_error = status.starts_with("error: test failed, to rerun pass")
            || (status.starts_with("error: ")
                && status.contains(" target")
                && status.ends_with("failed:"));
        // The targets listed under `error: N targets failed:` (`` `--lib` ``, `` `--test t` ``).
        let failed_target = line.starts_with("    ")
            && status.len() > 2
            && status.starts_with('`')
            && status.ends_with('`');
        if cargo_error || failed_target {
            return;
        }
        if let Some(test) = section_header(line) {
            self.close_section();
            self.open = Some(FailedTest {
                binary: String::new(),
                test: test.to_string(),
                output: vec![line.to_string()],
            });
            return;
        }
        if let Some(open) = &mut self.open {
            if line != "failures:" && !line.starts_with("test result: ") {
                open.output.push(line.to_string());
                return;
            }
            self.close_section();
        }
        if self.in_failure_list {
            match line
                .strip_prefix("    ")
                .filter(|name| !name.contains(' ') && !name.starts_with('`'))
            {
                Some(test) => {
                    let index = self.results.len();
                    if !self
                        .failures
                        .iter()
                        .any(|(i, f)| *i == index && f.test == test)
                    {
                        let failure = FailedTest {
                            binary: String::new(),
                            test: test.to_string(),
                            output: Vec::new(),
                        };
                        self.failures.push((index, failure));
                    }
                    return;
                }
                None => self.in_failure_list = false,
            }
        }
        if line == "failures:" {
            self.in_failure_list = true;
            return;
        }
        if let Some(counts) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                counts
                    .split(';')
                    .find_map(|part| part.trim().strip_suffix(word)?.trim().rsplit(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            };
            self.results
                .push((count("passed"), count("failed"), count("ignored")));
        }
    }

    /// The binaries that reported so far, in the order they ran.
    pub fn binaries(&self) -> Vec<BinaryResult> {
        self.results
            .iter()
            .enumerate()
            .map(|(index, &(passed, failed, ignored))| BinaryResult {
                name: self.binary_name(index),
                passed,
                failed,
                ignored,
            })
            .collect()
    }

    /// The failing tests seen so far (a section still open counts).
    pub fn failures(&self) -> Vec<FailedTest> {
        let open = self
            .open
            .clone()
            .map(|open| (self.results.len(), trimmed(open)));
        self.failures
            .iter()
            .cloned()
            .chain(open)
            .map(|(index, mut failure)| {
                failure.binary = self.binary_name(index);
                failure
            })
            .collect()
    }

    /// The report as lines for stderr: one per binary, the failing tests' output, the total.
    pub fn render(&self) -> Vec<String> {
        let binaries = self.binaries();
        let mut out = Vec::new();
        for binary in &binaries {
            out.push(format!(
                "rba: test result of {}: {} passed, {} failed, {} ignored",
                binary.name, binary.passed, binary.failed, binary.ignored
            ));
        }
        for failure in self.failures() {
            if failure.output.is_empty() {
                out.push(format!(
                    "rba: failed test {} in {} (its output, if any, is inline above)",
                    failure.test, failure.binary
                ));
                continue;
            }
            out.push(format!(
                "rba: failed test {} in {}:",
                failure.test, failure.binary
            ));
            out.extend(failure.output.iter().map(|line| format!("    {line}")));
        }
        let total = |field: fn(&BinaryResult) -> u64| binaries.iter().map(field).sum::<u64>();
        let count = binaries.len();
        out.push(format!(
            "rba: tests total: {} passed, {} failed, {} ignored in {count} test binar{}",
            total(|b| b.passed),
            total(|b| b.failed),
            total(|b| b.ignored),
            if count == 1 { "y" } else { "ies" }
        ));
        out
    }

    /// Prints [`TestReport::render`] on stderr.
    pub fn print(&self) {
        for line in self.render() {
            eprintln!("{line}");
        }
    }

    /// The name of the binary of the `index`-th result.
    fn binary_name(&self, index: usize) -> String {
        self.announced
            .get(index)
            .cloned()
            .unwrap_or_else(|| "tests".to_string())
    }

    fn close_section(&mut self) {
        if let Some(open) = self.open.take() {
            self.failures.push((self.results.len(), trimmed(open)));
        }
    }
}

/// `---- NAME stdout ----` (or `stderr`, which libtest may print too) → NAME.
fn section_header(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("---- ")?;
    rest.strip_suffix(" stdout ----")
        .or_else(|| rest.strip_suffix(" stderr ----"))
        .filter(|name| !name.is_empty())
}

/// `unittests src/lib.rs (target/debug/deps/mixed_tests-0123abcd)` → `unittests src/lib.rs
/// (mixed_tests)`; an older cargo's bare `target/debug/deps/NAME-HASH` → `NAME`.
fn binary_label(running: &str) -> String {
    let running = running.trim();
    let (what, path) = match running.rsplit_once(" (") {
        Some((what, path)) => (Some(what), path.trim_end_matches(')')),
        None => (None, running),
    };
    let file = path.rsplit('/').next().unwrap_or(path);
    let name = match file.rsplit_once('-') {
        Some((name, hash)) if !hash.is_empty() && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            name
        }
        _ => file,
    };
    match what {
        Some(what) => format!("{what} ({name})"),
        None => name.to_string(),
    }
}

/// A section without blank lines at either end.
fn trimmed(mut failure: FailedTest) -> FailedTest {
    while failure.output.last().is_some_and(|l| l.trim().is_empty()) {
        failure.output.pop();
    }
    if failure.output.len() > 1 && failure.output[1].trim().is_empty() {
        let first_text = failure.output[1..]
            .iter()
            .position(|l| !l.trim().is_empty())
            .map_or(failure.output.len(), |p| p + 1);
        failure.output.drain(1..first_text);
    }
    failure
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `cargo test` printed for tests/fixtures/mixed-tests plus a second, passing binary.
    const LOG: &str = "   Compiling mixed-tests v0.1.0 (/workspace)
    Finished `test` profile [unoptimized + debuginfo] target(s) in 0.50s
     Running unittests src/lib.rs (/target/debug/deps/mixed_tests-0f1e2d3c4b5a6978)

running 2 tests
test tests::adds ... ok
test tests::fails_on_purpose ... FAILED

failures:

---- tests::fails_on_purpose stdout ----

thread 'tests::fails_on_purpose' panicked at src/lib.rs:14:9:
assertion `left == right` failed: this test fails on purpose
  left: 4
 right: 5
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace


failures:
    tests::fails_on_purpose

test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s

     Running tests/more.rs (/target/debug/deps/more-00112233aabbccdd)

running 3 tests
test a ... ok
test b ... ignored
test c ... ok

test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s

error: test failed, to rerun pass `--lib`";

    fn report(log: &str) -> TestReport {
        let mut report = TestReport::default();
        for line in log.lines() {
            report.line(line);
        }
        report
    }

    #[test]
    fn counts_per_binary_failures_and_total() {
        let report = report(LOG);
        assert_eq!(
            report.binaries(),
            vec![
                BinaryResult {
                    name: "unittests src/lib.rs (mixed_tests)".into(),
                    passed: 1,
                    failed: 1,
                    ignored: 0
                },
                BinaryResult {
                    name: "tests/more.rs (more)".into(),
                    passed: 2,
                    failed: 0,
                    ignored: 1
                },
            ]
        );
        let failures = report.failures();
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].test, "tests::fails_on_purpose");
        assert_eq!(failures[0].binary, "unittests src/lib.rs (mixed_tests)");
        assert_eq!(
            failures[0].output.first().unwrap(),
            "---- tests::fails_on_purpose stdout ----"
        );
        assert_eq!(
            failures[0].output[1],
            "thread 'tests::fails_on_purpose' panicked at src/lib.rs:14:9:"
        );
        assert!(
            failures[0]
                .output
                .last()
                .unwrap()
                .starts_with("note: run with")
        );
        let text = report.render().join("\n");
        assert!(text.contains(
            "rba: test result of unittests src/lib.rs (mixed_tests): 1 passed, 1 failed, 0 ignored"
        ));
        assert!(text.contains("    assertion `left == right` failed: this test fails on purpose"));
        assert!(
            text.ends_with("rba: tests total: 3 passed, 1 failed, 1 ignored in 2 test binaries")
        );
    }

    #[test]
    fn colours_doc_tests_and_no_results() {
        let doc = report(
            "\x1b[1m\x1b[32m   Doc-tests\x1b[0m mixed_tests\n\ntest result: \x1b[32mok\x1b[0m. 4 passed; 0 failed; 0 ignored\n",
        );
        assert_eq!(doc.binaries()[0].name, "doc-tests mixed_tests");
        assert_eq!(doc.binaries()[0].passed, 4);

        let empty = TestReport::default();
        assert_eq!(
            empty.render(),
            vec!["rba: tests total: 0 passed, 0 failed, 0 ignored in 0 test binaries"]
        );
        // `cargo test -v` names the rustc it runs with `Running `…``: not a test binary.
        let verbose = report(
            "     Running `rustc --crate-name x`\ntest result: ok. 1 passed; 0 failed; 0 ignored",
        );
        assert_eq!(verbose.binaries()[0].name, "tests");
    }

    #[test]
    fn failures_without_sections_are_named_from_the_list() {
        let nocapture = report(
            "     Running unittests src/lib.rs (/t/deps/m-0123456789abcdef)
thread 'tests::boom' panicked at src/lib.rs:1:1:
test tests::boom ... FAILED

failures:
    tests::boom

test result: FAILED. 0 passed; 1 failed; 0 ignored",
        );
        let failures = nocapture.failures();
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].test, "tests::boom");
        assert!(failures[0].output.is_empty());
        assert!(nocapture.render().join("\n").contains(
            "rba: failed test tests::boom in unittests src/lib.rs (m) (its output, if any, is inline above)"
        ));
        // With sections, the list does not name a test twice.
        assert_eq!(report(LOG).failures().len(), 1);
    }

    #[test]
    fn the_next_binarys_name_may_come_before_the_last_ones_results() {
        // cargo's stderr (`Doc-tests`) overtook the unit tests' stdout in the merged log.
        let raced = report(
            "     Running unittests src/lib.rs (/t/deps/mixed_tests-0123456789abcdef)
   Doc-tests mixed_tests
running 2 tests
test tests::fails_on_purpose ... FAILED
failures:

---- tests::fails_on_purpose stdout ----
boom

failures:
    tests::fails_on_purpose

test result: FAILED. 1 passed; 1 failed; 0 ignored
running 0 tests
test result: ok. 0 passed; 0 failed; 0 ignored",
        );
        let names: Vec<_> = raced.binaries().into_iter().map(|b| b.name).collect();
        assert_eq!(
            names,
            [
                "unittests src/lib.rs (mixed_tests)",
                "doc-tests mixed_tests"
            ]
        );
        let failures = raced.failures();
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].binary, "unittests src/lib.rs (mixed_tests)");
        assert_eq!(failures[0].output[1], "boom");
    }

    #[test]
    fn cargos_lines_inside_a_failure_section_announce_and_stay_out_of_it() {
        // cargo's stderr arrived in the middle of the unit tests' failure section.
        let raced = report(
            "     Running unittests src/lib.rs (/t/deps/mixed_tests-0123456789abcdef)
running 2 tests
test tests::fails_on_purpose ... FAILED
failures:

---- tests::fails_on_purpose stdout ----
error: test failed, to rerun pass `--lib`
   Doc-tests mixed_tests
boom
error: 1 target failed:
    `--lib`

failures:
    tests::fails_on_purpose

test result: FAILED. 1 passed; 1 failed; 0 ignored
running 0 tests
test result: ok. 0 passed; 0 failed; 0 ignored",
        );
        let names: Vec<_> = raced.binaries().into_iter().map(|b| b.name).collect();
        assert_eq!(
            names,
            [
                "unittests src/lib.rs (mixed_tests)",
                "doc-tests mixed_tests"
            ]
        );
        let failures = raced.failures();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(
            failures[0].output,
            ["---- tests::fails_on_purpose stdout ----", "boom"]
        );
    }

    #[test]
    fn labels_of_test_binaries() {
        assert_eq!(
            binary_label("unittests src/main.rs (target/debug/deps/app-0123456789abcdef)"),
            "unittests src/main.rs (app)"
        );
        assert_eq!(
            binary_label("target/debug/deps/app-0123456789abcdef"),
            "app"
        );
        assert_eq!(
            binary_label("tests/it.rs (/t/deps/my-crate)"),
            "tests/it.rs (my-crate)"
        );
    }
}
