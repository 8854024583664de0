// The HTTP/2 endpoint behind the sidecar in scripts/h2spec.sh: h2c with prior knowledge (Go's
// golang.org/x/net/http2 server, an implementation independent of the sidecar's), reads each
// request body to the end and answers 200 with a 1 KiB body (h2spec's flow-control cases need
// at least 5 bytes of response data, or they are skipped) and a trailer. It listens on the address
// given as its only argument (127.0.0.1:0 picks a port) and prints the address it bound.
package main

import (
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"golang.org/x/net/http2"
)

// 1 KiB: 64 lines of 16 bytes.
var body = strings.Repeat("sagamesh h2spec\n", 64)

func main() {
	addr := "127.0.0.1:0"
	if len(os.Args) > 1 {
		addr = os.Args[1]
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		log.Fatalf("listen %s: %v", addr, err)
	}
	fmt.Println(ln.Addr().String())
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		w.Header().Set("Trailer", "x-received")
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, body)
		w.Header().Set("x-received", fmt.Sprint(n))
	})
	h2 := &http2.Server{IdleTimeout: 60 * time.Second}
	for {
		conn, err := ln.Accept()
		if err != nil {
			log.Printf("accept: %v", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		go h2.ServeConn(conn, &http2.ServeConnOpts{Handler: handler})
	}
}
