# casnix: build, install (binary + systemd units), container image.
#
#   make                      # ./casnix, static (CGO_ENABLED=0), version from git
#   sudo make install         # /usr/local/bin/casnix + /etc/systemd/system/casnix.{socket,service}
#   sudo systemctl daemon-reload && sudo systemctl enable --now casnix.socket
#   make image                # container image from ./casnix (no registry needed)
#   make image-golang         # container image compiled in golang:1.26 (needs a registry)
#   make test                 # the whole suite, as .ci/run

VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
UNITDIR ?= /etc/systemd/system
DESTDIR ?=
IMAGE ?= casnix:$(VERSION)
CONTAINER ?= podman
LDFLAGS := -s -w -X github.com/casnix/casnix/cli.Version=$(VERSION)

.PHONY: all casnix install uninstall image image-golang test clean

all: casnix

casnix:
	CGO_ENABLED=0 go build -trimpath -ldflags '$(LDFLAGS)' -o casnix .

install: casnix
	install -D -m 0755 casnix $(DESTDIR)$(BINDIR)/casnix
	install -D -m 0644 contrib/systemd/casnix.socket $(DESTDIR)$(UNITDIR)/casnix.socket
	sed 's|/usr/local/bin/casnix|$(BINDIR)/casnix|' contrib/systemd/casnix.service >$(DESTDIR)$(UNITDIR)/casnix.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/casnix.service
	@echo "installed; now: systemctl daemon-reload && systemctl enable --now casnix.socket"

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/casnix $(DESTDIR)$(UNITDIR)/casnix.socket $(DESTDIR)$(UNITDIR)/casnix.service

image: casnix
	$(CONTAINER) build --format docker --build-arg BINARY=prebuilt --build-arg VERSION=$(VERSION) -t $(IMAGE) .

image-golang:
	$(CONTAINER) build --format docker --build-arg VERSION=$(VERSION) -t $(IMAGE) .

test:
	go test -count=1 -timeout 55m ./...

clean:
	rm -f casnix
