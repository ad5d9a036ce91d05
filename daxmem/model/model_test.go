package model

import (
	"flag"
	"strings"
	"testing"
)

var full = flag.Bool("model.full", false, "also explore the larger configurations (minutes)")

// Scripts: 0k = acquire key k (claim or reference), 1k = unref k, 20 = GC.
var base = Config{
	Participants: 2,
	Entries:      3,
	Units:        3,
	ClaimUnits:   [2]int{2, 1},
	Scripts: [][]int{
		{0, 20, 10},
		{1, 0, 20},
	},
	MaxCrashes:  1,
	MaxRestarts: 1,
	MaxAborts:   1,
	MaxStates:   20_000_000,
}

func TestProtocolModel(t *testing.T) {
	cases := map[string]Config{}
	small := base
	small.Scripts = [][]int{{0, 20, 10}, {0, 20}}
	cases["two participants on one key, crash, restart, abort"] = small
	three := base
	three.Participants = 3
	three.Scripts = [][]int{{0}, {0, 20}, {20, 10}}
	three.MaxRestarts = 0
	three.MaxAborts = 0
	cases["three participants, one crash"] = three
	tight := base
	tight.Units = 2 // both images cannot be held at once with a 2-unit claim
	tight.Scripts = [][]int{{0, 1, 10}, {1, 20}}
	cases["tight data area"] = tight
	if *full {
		cases["full: two participants, two keys"] = base
		big := base
		big.Scripts = [][]int{{0, 1, 20, 10, 20}, {1, 0, 10, 20, 11}}
		cases["full: longer scripts"] = big
		big3 := big
		big3.Participants = 3
		big3.Scripts = [][]int{{0, 20, 10}, {0, 1, 10, 20}, {1, 20, 11}}
		big3.MaxRestarts, big3.MaxAborts = 0, 0
		cases["full: three participants"] = big3
		crashes := big
		crashes.MaxCrashes, crashes.MaxRestarts, crashes.MaxAborts = 2, 2, 0
		cases["full: two crashes, two restarts"] = crashes
	}
	for name, cfg := range cases {
		t.Run(name, func(t *testing.T) {
			res := Explore(cfg)
			t.Logf("%d states, %d transitions", res.States, res.Transitions)
			if res.Violation != "" {
				t.Fatalf("%s\ntrace:\n  %s", res.Violation, strings.Join(res.Trace, "\n  "))
			}
			if res.States < 1000 {
				t.Fatalf("only %d states: the model explores too little", res.States)
			}
		})
	}
}

// TestModelCatchesBugs shows the checker is not vacuous: each injected
// protocol mistake is found.
func TestModelCatchesBugs(t *testing.T) {
	for _, tc := range []struct {
		bug  Bug
		want string
	}{
		{BugGCNoRecheck, "freed"},
		{BugClaimNoFind, "converted twice"},
		{BugNoSteal, "no progress"},
	} {
		cfg := base
		cfg.Scripts = [][]int{{0, 20}, {1, 0}}
		cfg.Bug = tc.bug
		res := Explore(cfg)
		if !strings.Contains(res.Violation, tc.want) {
			t.Errorf("bug %d: violation %q, want one mentioning %q", tc.bug, res.Violation, tc.want)
		} else {
			t.Logf("bug %d found after %d states: %s (trace of %d steps)", tc.bug, res.States, res.Violation, len(res.Trace))
		}
	}
}
