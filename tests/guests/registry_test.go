package guests

import (
	"bytes"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

// pushImage uploads a built image to the registry at host (plain HTTP,
// the distribution API's monolithic uploads) as repo:tag.
func pushImage(tb testing.TB, host, repo, tag string, built *testimage.Built) {
	tb.Helper()
	base := "http://" + host + "/v2/" + repo
	for _, b := range append([]testimage.Blob{built.Config}, built.Layers...) {
		resp, err := http.Post(base+"/blobs/uploads/", "", nil)
		if err != nil {
			tb.Fatal(err)
		}
		resp.Body.Close()
		loc := resp.Header.Get("Location")
		if resp.StatusCode != http.StatusAccepted || loc == "" {
			tb.Fatalf("starting the upload of %s: %s", b.Descriptor.Digest, resp.Status)
		}
		u, err := url.Parse(loc)
		if err != nil {
			tb.Fatal(err)
		}
		if !u.IsAbs() {
			u = (&url.URL{Scheme: "http", Host: host}).ResolveReference(u)
		}
		q := u.Query()
		q.Set("digest", b.Descriptor.Digest.String())
		u.RawQuery = q.Encode()
		put(tb, u.String(), "application/octet-stream", b.Data)
	}
	put(tb, base+"/manifests/"+tag, built.Manifest.Descriptor.MediaType, built.Manifest.Data)
}

func put(tb testing.TB, url, contentType string, data []byte) {
	tb.Helper()
	req, err := http.NewRequest(http.MethodPut, url, bytes.NewReader(data))
	if err != nil {
		tb.Fatal(err)
	}
	req.Header.Set("Content-Type", contentType)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		b, _ := io.ReadAll(resp.Body)
		tb.Fatalf("PUT %s: %s: %s", url, resp.Status, b)
	}
}

// countingProxy forwards one guest's registry traffic to the registry and
// counts the bytes of blobs it served, by digest: what that guest
// downloaded.
type countingProxy struct {
	Addr string // 127.0.0.1:port

	mu    sync.Mutex
	blobs map[string]int64
}

func startCountingProxy(tb testing.TB, registry string) *countingProxy {
	tb.Helper()
	target := &url.URL{Scheme: "http", Host: registry}
	p := &countingProxy{blobs: map[string]int64{}}
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.ModifyResponse = func(resp *http.Response) error {
		path := resp.Request.URL.Path
		if resp.Request.Method != http.MethodGet || !strings.Contains(path, "/blobs/") {
			return nil
		}
		dgst := path[strings.LastIndex(path, "/")+1:]
		resp.Body = &countingBody{ReadCloser: resp.Body, add: func(n int) {
			p.mu.Lock()
			p.blobs[dgst] += int64(n)
			p.mu.Unlock()
		}}
		return nil
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	srv := &http.Server{Handler: rp, ReadHeaderTimeout: time.Minute}
	go srv.Serve(l)
	tb.Cleanup(func() { srv.Close() })
	p.Addr = l.Addr().String()
	return p
}

// Served returns the bytes of each blob served so far.
func (p *countingProxy) Served() map[string]int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[string]int64, len(p.blobs))
	maps.Copy(out, p.blobs)
	return out
}

// LayerBytes returns the bytes served of the image's layer blobs.
func (p *countingProxy) LayerBytes(built *testimage.Built) int64 {
	served := p.Served()
	var n int64
	for _, l := range built.Layers {
		n += served[l.Descriptor.Digest.String()]
	}
	return n
}

func (p *countingProxy) String() string { return fmt.Sprint(p.Served()) }

type countingBody struct {
	io.ReadCloser
	add func(int)
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.add(n)
	return n, err
}
