package store

import (
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"
)

func TestSignVerify(t *testing.T) {
	sk, pk, err := signature.GenerateKeypair("test-1", rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(file, []byte(sk.String()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	key, err := LoadSecretKeyFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if key.PublicKey() != pk.String() || key.Name() != "test-1" {
		t.Fatalf("public key %q, want %q", key.PublicKey(), pk.String())
	}
	pi := &PathInfo{Name: "7rjj86a15146cq1d7qy6x6xhcsg6yv3x-hello-2.12", NarSize: 226552,
		References: []string{"7rjj86a15146cq1d7qy6x6xhcsg6yv3x-hello-2.12", "aaaa6a15146cq1d7qy6x6xhcsg6yv3x-glibc"}}
	pi.NarHash[0] = 1
	sig, err := key.Sign("/nix/store", pi)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := ParsePublicKeys([]string{"other:" + pk.String()[len("test-1:"):] + " " + pk.String()})
	if err != nil {
		t.Fatal(err)
	}
	tampered := *pi
	tampered.NarSize++
	cases := []struct {
		name string
		pi   PathInfo
		sigs []string
		want int
	}{
		{"valid", *pi, []string{sig}, 1},
		{"twice counts once", *pi, []string{sig, sig}, 1},
		{"unsigned", *pi, nil, 0},
		{"tampered size", tampered, []string{sig}, 0},
		{"garbage", *pi, []string{"test-1:!!", "nokey"}, 0},
		{"unknown key", *pi, []string{"nobody" + sig[len("test-1"):]}, 0},
	}
	for _, c := range cases {
		c.pi.Sigs = c.sigs
		if got := keys.Verify("/nix/store", &c.pi); got != c.want {
			t.Errorf("%s: Verify = %d, want %d", c.name, got, c.want)
		}
	}
	if got := Fingerprint("/nix/store", pi); got != "1;/nix/store/7rjj86a15146cq1d7qy6x6xhcsg6yv3x-hello-2.12;sha256:"+NixBase32(pi.NarHash[:])+
		";226552;/nix/store/7rjj86a15146cq1d7qy6x6xhcsg6yv3x-hello-2.12,/nix/store/aaaa6a15146cq1d7qy6x6xhcsg6yv3x-glibc" {
		t.Errorf("fingerprint %q", got)
	}
	if _, err := ParsePublicKeys([]string{"bad"}); err == nil {
		t.Error("ParsePublicKeys accepted a malformed key")
	}
}

func TestGCLock(t *testing.T) {
	ctx := context.Background()
	s, err := Open(ctx, t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	r1, err := s.SharedGCLock(ctx)
	if err != nil {
		t.Fatal(err)
	}
	r2, err := s.SharedGCLock(ctx)
	if err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if _, err := s.ExclusiveGCLock(short); err == nil {
		t.Fatal("exclusive lock granted while shared holders remain")
	}
	r1()
	r2()
	rx, err := s.ExclusiveGCLock(ctx)
	if err != nil {
		t.Fatal(err)
	}
	short2, cancel2 := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel2()
	if _, err := s.SharedGCLock(short2); err == nil {
		t.Fatal("shared lock granted during exclusive hold")
	}
	rx()
}
