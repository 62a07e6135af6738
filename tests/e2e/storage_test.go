package e2e

// Storage faults (issue #7, RELIABILITY.md "Storage faults"): the disk holding the store fills
// up and frees again under a running Caddy, and a second Caddy (or `caddy validate`) meets a
// store file the first one holds.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/caddy-progress/progress/upstreamhook"
)

// mountTmpfs mounts a tmpfs of the given size (as mount -o size=) on a new folder and unmounts
// it when the test ends. Mounting needs root (CAP_SYS_ADMIN): without it the test skips, loudly,
// unless CI is set; then it fails, so that CI cannot pass without having run it.
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "disk")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", dir, "tmpfs", syscall.MS_NOSUID|syscall.MS_NODEV, "size="+size+",mode=0700"); err != nil {
		msg := fmt.Sprintf("cannot mount a %s tmpfs on %s (needs root or CAP_SYS_ADMIN; uid %d): %v", size, dir, os.Getuid(), err)
		if os.Getenv("CI") != "" {
			t.Fatal("CI is set, so the storage fault test must run: " + msg)
		}
		loud("SKIPPING " + t.Name() + ": " + msg)
		t.Skip("SKIPPED: " + msg)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, 0); err != nil {
			t.Errorf("unmounting the test tmpfs %s: %v", dir, err)
			syscall.Unmount(dir, syscall.MNT_DETACH)
		}
	})
	return dir
}

// newCaddyOn prepares, without starting it, a Caddy like startCaddy's whose store file is
// storePath, with extra lines in the global progress block. It is stopped when the test ends;
// allowed lists substrings of progress error log lines the test expects (checkLog fails on the
// others).
func newCaddyOn(t *testing.T, storePath string, allowed []string, extra ...string) *caddyProc {
	t.Helper()
	needBinaries(t)
	dir := t.TempDir()
	c := &caddyProc{
		t: t, dir: dir,
		configPath: filepath.Join(dir, "Caddyfile"),
		storePath:  storePath,
		admin:      "127.0.0.1:" + strconv.Itoa(freePort(t, false)),
		httpPort:   freePort(t, false),
		httpsPort:  freePort(t, true),
		closedAddr: "127.0.0.1:" + strconv.Itoa(freePort(t, false)),
	}
	cfg := c.caddyfile(caddyOptions{})
	const anchor = "\t\tmax_wait 30s\n"
	if !strings.Contains(cfg, anchor) {
		t.Fatalf("the harness's Caddyfile has no %q line to add options after:\n%s", anchor, cfg)
	}
	var lines strings.Builder
	for _, l := range extra {
		lines.WriteString("\t\t" + l + "\n")
	}
	cfg = strings.Replace(cfg, anchor, anchor+lines.String(), 1)
	if err := os.WriteFile(c.configPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if c.cmd == nil {
			return
		}
		c.stopAllowing(allowed)
		if t.Failed() {
			c.dumpLog()
		}
	})
	return c
}

// stopAllowing is stop, with the progress error lines that contain one of allowed accepted.
func (c *caddyProc) stopAllowing(allowed []string) {
	c.t.Helper()
	if c.cmd == nil || c.stopped {
		return
	}
	if _, err := c.stopWithin(10 * time.Second); err != nil {
		c.t.Error(err)
	}
lines:
	for _, line := range c.logs.all() {
		switch {
		case strings.Contains(line, "WARNING: DATA RACE"), strings.HasPrefix(line, "panic:"),
			strings.Contains(line, `"msg":"panic`), strings.Contains(line, "fatal error:"):
			c.t.Errorf("caddy log: %s", line)
		case strings.Contains(line, `"level":"error"`) && strings.Contains(line, `"logger":"progress`):
			for _, a := range allowed {
				if strings.Contains(line, a) {
					continue lines
				}
			}
			c.t.Errorf("caddy log, progress error: %s", line)
		}
	}
}

// fillDisk writes a file at path until the filesystem has no block left, and returns its size.
func fillDisk(t *testing.T, path string) int64 {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var size int64
	// Big chunks first, then page-sized ones for the last partial chunk; each loop ends at
	// ENOSPC, and is bounded anyway in case the filesystem never says so.
	for _, chunk := range []int{256 << 10, 4 << 10} {
		buf := make([]byte, chunk)
		for i := 0; ; i++ {
			if i == 1<<16 {
				t.Fatalf("wrote %d bytes to %s without filling the disk", size, path)
			}
			n, err := f.Write(buf)
			size += int64(n)
			if errors.Is(err, syscall.ENOSPC) {
				break
			}
			if err != nil {
				t.Fatalf("filling the disk: %v", err)
			}
		}
	}
	return size
}

// freeBytes is what the filesystem holding path has left for unprivileged writers.
func freeBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(path, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Bavail) * st.Bsize
}

func randomName(t *testing.T) string {
	t.Helper()
	b := make([]byte, 8)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// openGate lets the upstream's /gate?name= requests answer.
func openGate(t *testing.T, name string) {
	t.Helper()
	resp, err := http.Post("http://"+upstreamAddr+"/open?name="+name, "", nil)
	if err != nil {
		t.Fatalf("opening gate %s: %v", name, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("opening gate %s: status %d", name, resp.StatusCode)
	}
}

// report posts one progress report for job id, as the upstream would.
func (cl *client) report(t *testing.T, id, token string, current int) *reply {
	t.Helper()
	body := fmt.Appendf(nil, `{"current": %d, "total": 100000, "message": "step %d"}`, current, current)
	return cl.do(t, http.MethodPost, "/_jobs/"+id+"/progress", body,
		"Authorization", "Bearer "+token, "Content-Type", "application/json")
}

// checkBoltFile opens a store file read-only, as bbolt, and runs bbolt's consistency check.
func checkBoltFile(t *testing.T, path string) (jobs int) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatalf("opening the store file %s with bbolt: %v", path, err)
	}
	defer db.Close()
	err = db.View(func(tx *bolt.Tx) error {
		for err := range tx.Check() {
			t.Errorf("bbolt check of %s: %v", path, err)
		}
		if b := tx.Bucket([]byte("jobs")); b != nil {
			jobs = b.Stats().KeyN
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return jobs
}

const diskSize = "8m"

// TestStorageDiskFull fills the small filesystem that holds the store file and the results
// folder while jobs run, then frees it, all under one running Caddy:
//
//   - while the disk is full, new jobs get 503 with a store-unavailable problem document and
//     progress reports get 503 (or 204 while bbolt still finds free pages inside its file:
//     then they are durable), never a 500 or a hang; reads keep working;
//   - jobs whose upstream answers while the disk is full do not stay running: they end once the
//     store can record it, with the upstream's response or failed with result_unstorable (a
//     result that could not be written), and an event stream followed across it ends on done;
//   - once the filler is deleted, the next new job gets 202, without a restart;
//   - the store file passes bbolt's consistency check, and after a restart every acknowledged
//     job is there, finished, with its acknowledged progress.
func TestStorageDiskFull(t *testing.T) {
	disk := mountTmpfs(t, diskSize)
	secret := "storage-test-secret-" + randomName(t) + randomName(t)
	signer := upstreamhook.NewSigner([]byte(secret))
	c := newCaddyOn(t, filepath.Join(disk, "progress.db"),
		[]string{"recording the end of a job"},
		"callback_secret "+secret,
		// Two journal files of 1 MiB, made in full at the start, take progress reports
		// while the disk is full until both are full and no checkpoint can empty them.
		"journal 1MiB")
	c.start()
	cl := c.newClient(t, "h2")

	// Jobs acknowledged before the disk fills: they must all survive.
	const before = 20
	var acked []string
	for range before {
		doc, _ := cl.startJob(t, http.MethodPost, "/jobs/slow?ms=0", nil)
		acked = append(acked, doc.ID)
	}
	for _, id := range acked {
		wantStatus(t, cl.result(t, id), http.StatusOK)
	}

	// Jobs running across the fill: their upstream answers once the disk is full. The small
	// answers fit in the database file; the large one must go to the results folder.
	gate := randomName(t)
	const gatedSmall = 3
	const largeSize = 1 << 20
	var gated []string
	for i := range gatedSmall + 1 {
		path := "/jobs/gate?name=" + gate
		if i == gatedSmall {
			path += "&size=" + strconv.Itoa(largeSize)
		}
		doc, _ := cl.startJob(t, http.MethodGet, path, nil)
		gated = append(gated, doc.ID)
		acked = append(acked, doc.ID)
	}
	for _, id := range gated {
		if !upstreamSeen(t, id, "started", 20*time.Second).Started {
			t.Fatalf("job %s: the upstream never got its request", id)
		}
	}
	reported := gated[0]
	token := signer.Token(reported)
	wantStatus(t, cl.report(t, reported, token, 1), http.StatusNoContent)
	ackedSeq := cl.job(t, reported).Seq

	// A client follows the first gated job's events across the whole fault.
	followCtx, stopFollow := context.WithTimeout(context.Background(), 3*time.Minute)
	defer stopFollow()
	var followed *sseResult
	var following sync.WaitGroup
	following.Go(func() {
		followed = cl.follow(followCtx, "/_jobs/"+reported+"/events", sseOptions{MaxConns: 3})
	})

	// Fill the disk.
	dbBefore, _ := os.Stat(c.storePath)
	filler := filepath.Join(disk, "filler")
	fillStart := time.Now()
	filled := fillDisk(t, filler)
	t.Logf("filled the %s tmpfs: filler %d bytes in %v, store file %d bytes, %d bytes left",
		diskSize, filled, time.Since(fillStart).Round(time.Millisecond), dbBefore.Size(), freeBytes(t, disk))
	if free := freeBytes(t, disk); free != 0 {
		t.Fatalf("the disk still has %d bytes free after filling", free)
	}

	// New jobs while the disk is full. bbolt reuses the pages freed inside its file first, so
	// some creations may still succeed (and are then acknowledged); the file must grow soon,
	// and that fails.
	var fullProblem problemDoc
	createdWhileFull, attempts := 0, 0
	for ; ; attempts++ {
		if attempts == 500 {
			t.Fatalf("500 jobs created on a full disk, none refused")
		}
		r := cl.do(t, http.MethodPost, "/jobs/slow?ms=0", nil, "Prefer", "respond-async")
		if r.StatusCode == http.StatusAccepted {
			acked = append(acked, decodeJSON[jobDoc](t, r).ID)
			createdWhileFull++
			continue
		}
		fullProblem = wantProblem(t, r, http.StatusServiceUnavailable)
		if !strings.HasSuffix(fullProblem.Type, "#problem-store-unavailable") {
			t.Errorf("job refused on a full disk: problem type %q, want …#problem-store-unavailable", fullProblem.Type)
		}
		if !strings.Contains(fullProblem.Detail, "no space left on device") {
			t.Errorf("job refused on a full disk: the detail does not say the disk is full: %q", fullProblem.Detail)
		}
		if ra, err := strconv.Atoi(r.Header.Get("Retry-After")); err != nil || ra < 1 {
			t.Errorf("job refused on a full disk: Retry-After %q, want seconds", r.Header.Get("Retry-After"))
		}
		t.Logf("full disk: %d jobs created, then 503 %+v", createdWhileFull, fullProblem)
		break
	}
	// Later ones are refused too, or accepted (and then durable) when bbolt has released pages
	// that readers held: anything but 202 or a 503 problem is wrong.
	const moreWhileFull = 5
	for range moreWhileFull {
		r := cl.do(t, http.MethodPost, "/jobs/slow?ms=0", nil, "Prefer", "respond-async")
		if r.StatusCode == http.StatusAccepted {
			acked = append(acked, decodeJSON[jobDoc](t, r).ID)
			createdWhileFull++
			continue
		}
		wantProblem(t, r, http.StatusServiceUnavailable)
	}

	// Progress reports while the disk is full: 204 (durable: in the journal, whose files
	// were allocated at the start, or in bbolt's free pages) or a 503 problem once both
	// journal files are full and no checkpoint can copy them into the full store file. A
	// report's record here is under 1 KB: at most about 2,200 fit the two files.
	var reportProblem problemDoc
	reports204 := 0
	for i := 2; ; i++ {
		if i == 5000 {
			t.Fatalf("5000 progress reports accepted on a full disk, none refused")
		}
		r := cl.report(t, reported, token, i)
		if r.StatusCode == http.StatusNoContent {
			reports204++
			ackedSeq = max(ackedSeq, cl.job(t, reported).Seq)
			continue
		}
		reportProblem = wantProblem(t, r, http.StatusServiceUnavailable)
		if !strings.HasSuffix(reportProblem.Type, "#problem-store-unavailable") || !strings.Contains(reportProblem.Detail, "no space left on device") {
			t.Errorf("progress report refused on a full disk: %+v", reportProblem)
		}
		t.Logf("full disk: %d progress reports accepted, then 503 %+v", reports204, reportProblem)
		break
	}

	// Reads need no space.
	wantStatus(t, cl.get(t, "/_jobs/"+acked[0]), http.StatusOK)
	wantStatus(t, cl.get(t, "/_jobs/"+acked[0]+"/result"), http.StatusOK)

	// The gated jobs' upstream answers now, on the full disk.
	openGate(t, gate)
	for _, id := range gated {
		if !upstreamSeen(t, id, "finished", 20*time.Second).Finished {
			t.Fatalf("job %s: the upstream did not answer after the gate opened", id)
		}
	}
	var stateWhileFull []string
	for _, id := range gated {
		stateWhileFull = append(stateWhileFull, cl.job(t, id).State)
	}
	t.Logf("gated jobs right after their upstream answered on the full disk: %v", stateWhileFull)

	// Space returns: the next job is accepted, without a restart.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	freed := time.Now()
	resumeAttempts := 0
	for {
		resumeAttempts++
		r := cl.do(t, http.MethodPost, "/jobs/slow?ms=0", nil, "Prefer", "respond-async")
		if r.StatusCode == http.StatusAccepted {
			acked = append(acked, decodeJSON[jobDoc](t, r).ID)
			break
		}
		wantProblem(t, r, http.StatusServiceUnavailable)
		if resumeAttempts == 50 {
			t.Fatalf("still 503 after 50 attempts since the disk was freed")
		}
		cl.get(t, "/_jobs/"+acked[0]+"?after=1000000&wait=100ms") // a bounded pause, served by Caddy
	}
	resumed := time.Since(freed)
	t.Logf("space returned: first job accepted after %d attempt(s), %v after the filler was deleted", resumeAttempts, resumed.Round(time.Millisecond))
	if resumeAttempts != 1 {
		t.Errorf("the first job after space returned was refused (%d attempts): nothing should hold the failure", resumeAttempts)
	}

	// Every job ends: the gated ones with their response, or failed because it could not be
	// stored (the large one's spool file could not be written on the full disk; a refused
	// Finish lets go of the small ones' bodies).
	for i, id := range gated {
		r := cl.result(t, id)
		doc := cl.job(t, id)
		if !doc.terminal() {
			t.Errorf("gated job %d (%s) is still %q after the disk was freed: its end was never recorded", i, id, doc.State)
			continue
		}
		switch {
		case doc.State == "succeeded" && i < gatedSmall:
			wantStatus(t, r, http.StatusOK)
			if string(r.body) != "gg" {
				t.Errorf("gated job %d: result body %q, want gg", i, r.body)
			}
		case doc.State == "failed" && doc.Error != nil && doc.Error.Code == "result_unstorable":
			p := wantProblem(t, r, http.StatusBadGateway)
			t.Logf("gated job %d ended failed: %s; /result: %d %s", i, doc.Error.Message, p.Status, p.Title)
		default:
			t.Errorf("gated job %d ended %q (error %+v), want succeeded with the small body or failed with result_unstorable", i, doc.State, doc.Error)
		}
	}
	t.Logf("gated jobs ended %v after the disk was freed", time.Since(freed).Round(time.Millisecond))
	for _, id := range acked {
		if r := cl.result(t, id); r.StatusCode == http.StatusAccepted {
			t.Errorf("job %s has not ended 25s after the disk was freed", id)
		}
	}
	if d := cl.job(t, reported); d.Seq < ackedSeq {
		t.Errorf("job %s: seq %d, below the %d acknowledged", reported, d.Seq, ackedSeq)
	}
	following.Wait()
	checkStream(t, "events of "+reported, followed)

	// The file is sound, and after a restart everything acknowledged is there.
	c.stopAllowing([]string{"recording the end of a job"})
	onDisk := checkBoltFile(t, c.storePath)
	if onDisk < len(acked) {
		t.Errorf("the store file holds %d jobs, %d were acknowledged", onDisk, len(acked))
	}
	c.restart()
	cl = c.newClient(t, "h2")
	for _, id := range acked {
		doc := cl.job(t, id)
		if !doc.terminal() || (doc.Error != nil && doc.Error.Code == "interrupted") {
			t.Errorf("after the restart job %s is %q (error %+v); it had ended before", id, doc.State, doc.Error)
		}
	}
	if d := cl.job(t, reported); d.Seq < ackedSeq {
		t.Errorf("after the restart job %s has seq %d, below the %d acknowledged", reported, d.Seq, ackedSeq)
	}
	t.Logf("acknowledged jobs: %d (%d before the fill, %d gated, %d created on the full disk, 1 after); %d in the store file; checked after the restart",
		len(acked), before, len(gated), createdWhileFull, onDisk)
}

// TestStorageLocked starts a second Caddy, and runs `caddy validate`, with a config whose store
// file a running Caddy holds: both must fail after the open timeout with an error that names
// the file and says it is locked by another process. Once the first Caddy has stopped, the same
// config validates and starts.
func TestStorageLocked(t *testing.T) {
	first := startCaddy(t, caddyOptions{})
	const openTimeout = 2 * time.Second
	second := newCaddyOn(t, first.storePath, nil, "open_timeout "+openTimeout.String())
	for _, d := range []string{"home", "data", "config"} {
		if err := os.MkdirAll(filepath.Join(second.dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	abs, err := filepath.Abs(first.storePath)
	if err != nil {
		t.Fatal(err)
	}

	runCaddy := func(args ...string) (out []byte, took time.Duration, err error) {
		ctx, cancel := context.WithTimeout(context.Background(), openTimeout+90*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, caddyBin, append(args, "--config", second.configPath, "--adapter", "caddyfile")...)
		cmd.Dir = second.dir
		cmd.Env = second.env()
		start := time.Now()
		out, err = cmd.CombinedOutput()
		if ctx.Err() != nil {
			t.Fatalf("caddy %s did not end within %v: a locked store must not hang it\n%s", args[0], openTimeout+90*time.Second, out)
		}
		return out, time.Since(start), err
	}
	for _, verb := range []string{"run", "validate"} {
		out, took, err := runCaddy(verb)
		var exit *exec.ExitError
		if !errors.As(err, &exit) {
			t.Fatalf("caddy %s against a locked store: %v, want a non-zero exit\n%s", verb, err, out)
		}
		if bytes.Contains(out, []byte("serving initial configuration")) {
			t.Errorf("caddy %s against a locked store served its config", verb)
		}
		if !bytes.Contains(out, []byte("locked by another process")) || !bytes.Contains(out, []byte(abs)) {
			t.Errorf("caddy %s against a locked store: the output does not name %s and say it is locked by another process:\n%s", verb, abs, out)
		}
		// bbolt polls the lock every 50ms and gives up once the next poll would pass the
		// timeout: it must have waited, not failed at once.
		if took < openTimeout*3/4 {
			t.Errorf("caddy %s gave up after %v, well before the open timeout of %v", verb, took, openTimeout)
		}
		t.Logf("caddy %s against a locked store: exit %d after %v; %s", verb, exit.ExitCode(), took.Round(time.Millisecond), lockedLine(out))
	}

	// The first Caddy still serves, on its store.
	cl := first.newClient(t, "h1")
	doc, _ := cl.startJob(t, http.MethodPost, "/jobs/slow?ms=0", nil)
	wantStatus(t, cl.result(t, doc.ID), http.StatusOK)

	// Released, the file validates at once and serves the second Caddy, jobs and all.
	first.stop()
	out, took, err := runCaddy("validate")
	if err != nil {
		t.Fatalf("caddy validate after the first Caddy stopped: %v\n%s", err, out)
	}
	if took >= openTimeout {
		t.Errorf("caddy validate of a free store took %v, as long as the open timeout", took)
	}
	second.start()
	cl2 := second.newClient(t, "h1")
	if got := cl2.job(t, doc.ID); got.State != "succeeded" {
		t.Errorf("the second Caddy sees job %s as %q, want succeeded", doc.ID, got.State)
	}
}

// lockedLine picks the line of Caddy's output that holds the lock error.
func lockedLine(out []byte) string {
	for line := range strings.Lines(string(out)) {
		if strings.Contains(line, "locked by another process") {
			return strings.TrimSpace(line)
		}
	}
	return ""
}
