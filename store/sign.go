package store

import (
	"crypto/rand"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"
)

// Fingerprint is the string a Nix path signature signs:
// "1;<store path>;sha256:<nix32 NAR hash>;<NAR size>;<comma-separated
// full reference paths>", as Nix's ValidPathInfo::fingerprint builds it.
func Fingerprint(storeDir string, pi *PathInfo) string {
	var b strings.Builder
	b.WriteString("1;")
	b.WriteString(storeDir + "/" + pi.Name)
	b.WriteString(";sha256:")
	b.WriteString(NixBase32(pi.NarHash[:]))
	b.WriteString(";")
	b.WriteString(strconv.FormatInt(pi.NarSize, 10))
	b.WriteString(";")
	for i, r := range pi.References {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(storeDir + "/" + r)
	}
	return b.String()
}

// PublicKeys is a set of trusted Nix public keys ("name:base64"), what
// Nix's trusted-public-keys holds.
type PublicKeys map[string]signature.PublicKey

// ParsePublicKeys parses keys in Nix's format; each element may hold
// several, separated by spaces or commas.
func ParsePublicKeys(specs []string) (PublicKeys, error) {
	keys := PublicKeys{}
	for _, spec := range specs {
		for _, s := range strings.FieldsFunc(spec, func(r rune) bool { return r == ' ' || r == ',' || r == '\n' }) {
			k, err := signature.ParsePublicKey(s)
			if err != nil {
				return nil, fmt.Errorf("public key %q: %w", s, err)
			}
			keys[k.Name] = k
		}
	}
	return keys, nil
}

// Verify counts the signatures in sigs that a key in keys validates for
// the fingerprint of pi (Nix's checkSignatures). Unparseable signatures
// and signatures by unknown keys count for nothing.
func (keys PublicKeys) Verify(storeDir string, pi *PathInfo) int {
	if len(keys) == 0 || len(pi.Sigs) == 0 {
		return 0
	}
	return keys.VerifyFingerprint(Fingerprint(storeDir, pi), pi.Sigs)
}

// VerifyFingerprint counts the keys in keys that made a valid signature
// in sigs of fp.
func (keys PublicKeys) VerifyFingerprint(fp string, sigs []string) int {
	n := 0
	seen := map[string]bool{}
	for _, s := range sigs {
		sig, err := signature.ParseSignature(s)
		if err != nil || seen[sig.Name] {
			continue
		}
		if k, ok := keys[sig.Name]; ok && k.Verify(fp, sig) {
			seen[sig.Name] = true
			n++
		}
	}
	return n
}

// SecretKey signs path-info, in Nix's secret key format.
type SecretKey struct{ k signature.SecretKey }

// LoadSecretKeyFile reads a Nix secret key file ("name:base64", as
// `nix key generate-secret` writes).
func LoadSecretKeyFile(path string) (*SecretKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read secret key: %w", err)
	}
	k, err := signature.LoadSecretKey(strings.TrimSpace(string(data)))
	if err != nil {
		return nil, fmt.Errorf("secret key %s: %w", path, err)
	}
	return &SecretKey{k}, nil
}

// Name is the key's name.
func (k *SecretKey) Name() string { return k.k.ToPublicKey().Name }

// PublicKey is the matching public key in Nix's format.
func (k *SecretKey) PublicKey() string { return k.k.ToPublicKey().String() }

// SignRealisation adds the signature of r's fingerprint to r.
func (k *SecretKey) SignRealisation(r *Realisation) error {
	sig, err := k.k.Sign(rand.Reader, r.Fingerprint())
	if err != nil {
		return fmt.Errorf("sign realisation %s: %w", r.ID, err)
	}
	r.Signatures = append(r.Signatures, sig.String())
	return nil
}

// Sign returns the signature ("name:base64") of pi's fingerprint.
func (k *SecretKey) Sign(storeDir string, pi *PathInfo) (string, error) {
	sig, err := k.k.Sign(rand.Reader, Fingerprint(storeDir, pi))
	if err != nil {
		return "", fmt.Errorf("sign %s: %w", pi.Name, err)
	}
	return sig.String(), nil
}
