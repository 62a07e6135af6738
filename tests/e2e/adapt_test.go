package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// adapt runs `caddy adapt` on a Caddyfile and returns its JSON (indented), its stderr, and
// whether it succeeded.
func adapt(t *testing.T, caddyfile string) (out []byte, stderr string, err error) {
	t.Helper()
	dir := t.TempDir()
	caddyfile, err = filepath.Abs(caddyfile)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, caddyBin, "adapt", "--config", caddyfile, "--adapter", "caddyfile")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	if err := cmd.Run(); err != nil {
		return nil, logMessages(se.Bytes()), err
	}
	var buf bytes.Buffer
	if err := json.Indent(&buf, bytes.TrimSpace(so.Bytes()), "", "\t"); err != nil {
		t.Fatalf("caddy adapt printed something that is not JSON: %v\n%s", err, so.Bytes())
	}
	buf.WriteByte('\n')
	return buf.Bytes(), se.String(), nil
}

// TestAdaptGolden: the Caddyfile forms adapt to the JSON in testdata/adapt/*.json. Run with
// -update to rewrite the golden files after an intended change.
func TestAdaptGolden(t *testing.T) {
	needBinaries(t)
	inputs, err := filepath.Glob(filepath.Join("testdata", "adapt", "*.Caddyfile"))
	if err != nil || len(inputs) == 0 {
		t.Fatalf("no Caddyfiles under testdata/adapt: %v", err)
	}
	for _, in := range inputs {
		name := strings.TrimSuffix(filepath.Base(in), ".Caddyfile")
		t.Run(name, func(t *testing.T) {
			got, stderr, err := adapt(t, in)
			if err != nil {
				t.Fatalf("caddy adapt %s: %v\n%s", in, err, stderr)
			}
			golden := strings.TrimSuffix(in, ".Caddyfile") + ".json"
			if *updateGolden {
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run with -update to write it)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("caddy adapt %s differs from %s (run with -update if the change is intended):\n%s", in, golden, firstDiff(string(want), string(got)))
			}
		})
	}
}

// logMessages turns Caddy's JSON log lines into their messages, one a line, so that quotes in
// them read as they were written; other lines stay as they are.
func logMessages(b []byte) string {
	var out []string
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var entry struct {
			Msg   string `json:"msg"`
			Error string `json:"error"`
		}
		if json.Unmarshal([]byte(line), &entry) == nil && entry.Msg != "" {
			line = strings.TrimSpace(entry.Msg + " " + entry.Error)
		}
		out = append(out, line)
	}
	return strings.Join(out, "\n")
}

// firstDiff shows the first line where two texts differ, with some context.
func firstDiff(want, got string) string {
	wl, gl := strings.Split(want, "\n"), strings.Split(got, "\n")
	for i := 0; i < max(len(wl), len(gl)); i++ {
		var w, g string
		if i < len(wl) {
			w = wl[i]
		}
		if i < len(gl) {
			g = gl[i]
		}
		if w != g {
			from := max(0, i-3)
			return "context:\n" + strings.Join(gl[from:min(i, len(gl))], "\n") + "\nline " + strconv.Itoa(i+1) + ":\n  want: " + w + "\n  got:  " + g
		}
	}
	return "(no difference)"
}

// TestAdaptErrors: a mistake in the Caddyfile fails adapt with a message naming it and the
// line it is on.
func TestAdaptErrors(t *testing.T) {
	needBinaries(t)
	cases := []struct {
		name, caddyfile string
		want            []string // every one must be in the error
	}{
		{"unknown handler subdirective", ":8080 {\n\tprogress {\n\t\tconcurency 4\n\t}\n\treverse_proxy 127.0.0.1:9000\n}\n",
			[]string{`unrecognized subdirective "concurency"`, "Caddyfile:3"}},
		{"unknown global subdirective", "{\n\tprogress {\n\t\tretention 24h\n\t}\n}\n:8080 {\n\tprogress_api\n}\n",
			[]string{`unrecognized subdirective "retention"`, "Caddyfile:3"}},
		{"progress_api takes no block", ":8080 {\n\tprogress_api {\n\t\tjobs_path /x\n\t}\n}\n",
			[]string{`unrecognized subdirective "jobs_path"`, "Caddyfile:3"}},
		{"unknown async mode", ":8080 {\n\tprogress {\n\t\tasync sometimes\n\t}\n\treverse_proxy 127.0.0.1:9000\n}\n",
			[]string{`async "sometimes"`, "prefer, always or after"}},
		{"async after needs a duration", ":8080 {\n\tprogress {\n\t\tasync after\n\t}\n\treverse_proxy 127.0.0.1:9000\n}\n",
			[]string{"Caddyfile:3"}},
		{"bad duration", ":8080 {\n\tprogress {\n\t\ttimeout soon\n\t}\n\treverse_proxy 127.0.0.1:9000\n}\n",
			[]string{"soon", "Caddyfile:3"}},
		{"bad size", "{\n\tprogress {\n\t\tmax_result_size lots\n\t}\n}\n:8080 {\n\tprogress_api\n}\n",
			[]string{`"lots" is not a size`, "Caddyfile:3"}},
		{"bad journal size", "{\n\tprogress {\n\t\tjournal big\n\t}\n}\n:8080 {\n\tprogress_api\n}\n",
			[]string{`"big" is not a size`, "Caddyfile:3"}},
		{"negative count", ":8080 {\n\tprogress {\n\t\tconcurrency -1\n\t}\n\treverse_proxy 127.0.0.1:9000\n}\n",
			[]string{`"-1" is not a whole number`}},
		{"zero estimate interval", ":8080 {\n\tprogress {\n\t\testimate 0s\n\t}\n\treverse_proxy 127.0.0.1:9000\n}\n",
			[]string{`estimate "0s"`, "or off", "Caddyfile:3"}},
		{"estimate needs one argument", ":8080 {\n\tprogress {\n\t\testimate 1s off\n\t}\n\treverse_proxy 127.0.0.1:9000\n}\n",
			[]string{"Caddyfile:3"}},
		{"traces is on or off", "{\n\tprogress {\n\t\ttraces sometimes\n\t}\n}\n:8080 {\n\tprogress_api\n}\n",
			[]string{`traces must be on or off, not "sometimes"`, "Caddyfile:3"}},
		{"extra argument", ":8080 {\n\tprogress {\n\t\tconcurrency 4 5\n\t}\n\treverse_proxy 127.0.0.1:9000\n}\n",
			[]string{"Caddyfile:3"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "Caddyfile")
			if err := os.WriteFile(path, []byte(tc.caddyfile), 0o600); err != nil {
				t.Fatal(err)
			}
			out, stderr, err := adapt(t, path)
			if err == nil {
				t.Fatalf("caddy adapt accepted:\n%s\nand made:\n%s", tc.caddyfile, out)
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("the error does not contain %q:\n%s", w, stderr)
				}
			}
		})
	}
}
