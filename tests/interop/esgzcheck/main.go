// esgzcheck drives the Go reference eStargz implementation
// (github.com/containerd/stargz-snapshotter/estargz) so that the Python
// tests can check interoperability in both directions:
//
//	esgzcheck check BLOB TOCDIGEST
//	    Open BLOB, verify the TOC against TOCDIGEST, read every regular file
//	    and verify every chunk against its chunkDigest. Prints one JSON
//	    object per tree entry (JSON lines) on stdout.
//
//	esgzcheck build IN.tar OUT.esgz [-level N] [-chunk-size N] [-prioritized FILE] [-format F]
//	    estargz.Build IN.tar into OUT.esgz; prints the TOC digest on line 1
//	    and the DiffID on line 2. -format zstd builds zstd:chunked with the
//	    reference zstdchunked package (level: a zstd level, 3 by default).
//
// check accepts both formats: Open is given the zstdchunked decompressor too.
//
// Any error goes to stderr with exit status 1.
package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "check":
		err = cmdCheck(os.Args[2:])
	case "build":
		err = cmdBuild(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "esgzcheck %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: esgzcheck check BLOB TOCDIGEST\n"+
		"       esgzcheck build IN.tar OUT.esgz [-level N] [-chunk-size N] [-prioritized FILE]")
	os.Exit(2)
}

// record is what `check` prints per entry. NumLink is not part of the TOC
// JSON (the reader computes it), so it is copied explicitly.
type record struct {
	Name     string            `json:"name"`
	Type     string            `json:"type"`
	Size     int64             `json:"size"`
	Mode     int64             `json:"mode"`
	UID      int               `json:"uid"`
	GID      int               `json:"gid"`
	LinkName string            `json:"linkName"`
	DevMajor int               `json:"devMajor"`
	DevMinor int               `json:"devMinor"`
	Xattrs   map[string][]byte `json:"xattrs"` // []byte marshals as base64
	SHA256   string            `json:"sha256"`
	NumLink  int               `json:"numLink"`
	// TOCName is the entry's own name in the TOC. It differs from Name
	// (the path we walked) for hardlinks, which the reader resolves to the
	// entry of the link target.
	TOCName string `json:"tocName"`
}

func cmdCheck(args []string) error {
	if len(args) != 2 {
		usage()
	}
	tocDigest, err := digest.Parse(args[1])
	if err != nil {
		return fmt.Errorf("bad TOC digest %q: %w", args[1], err)
	}
	f, err := os.Open(args[0])
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	r, err := estargz.Open(io.NewSectionReader(f, 0, st.Size()),
		estargz.WithDecompressors(new(zstdchunked.Decompressor)))
	if err != nil {
		return fmt.Errorf("open: %w", err)
	}
	ver, err := r.VerifyTOC(tocDigest)
	if err != nil {
		return fmt.Errorf("verify TOC: %w", err)
	}
	root, ok := r.Lookup("")
	if !ok {
		return fmt.Errorf("no root directory")
	}
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	enc := json.NewEncoder(out)
	return walk(r, ver, enc, "", root)
}

// walk visits the children of dir in sorted order (ForeachChild iterates a
// Go map, so its order is random) and recurses into subdirectories.
func walk(r *estargz.Reader, ver estargz.TOCEntryVerifier, enc *json.Encoder, dirPath string, dir *estargz.TOCEntry) error {
	children := map[string]*estargz.TOCEntry{}
	var names []string
	dir.ForeachChild(func(base string, e *estargz.TOCEntry) bool {
		children[base] = e
		names = append(names, base)
		return true
	})
	sort.Strings(names)
	for _, base := range names {
		e := children[base]
		p := base
		if dirPath != "" {
			p = dirPath + "/" + base
		}
		rec := record{
			Name: p, Type: e.Type, Size: e.Size, Mode: e.Mode, UID: e.UID, GID: e.GID,
			LinkName: e.LinkName, DevMajor: e.DevMajor, DevMinor: e.DevMinor,
			Xattrs: e.Xattrs, NumLink: e.NumLink, TOCName: e.Name,
		}
		if rec.Xattrs == nil {
			rec.Xattrs = map[string][]byte{}
		}
		if e.Type == "reg" {
			// Read by the entry's own TOC name: for a hardlink, the
			// reader's chunk index is keyed by the target's name, and
			// ChunkEntryForOffset(linkPath, ...) would only see chunk 0.
			sum, err := readFile(r, ver, e.Name, e.Size)
			if err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
			rec.SHA256 = sum
		}
		if err := enc.Encode(&rec); err != nil {
			return err
		}
		if e.Type == "dir" {
			if err := walk(r, ver, enc, p, e); err != nil {
				return err
			}
		}
	}
	return nil
}

// readFile reads the whole file through OpenFile (the path a normal reader
// takes) and, separately, every chunk through ChunkEntryForOffset checked
// against its TOC digest (the path a lazy, verifying reader takes). Both
// must succeed; the full-content sha256 is returned as hex.
func readFile(r *estargz.Reader, ver estargz.TOCEntryVerifier, name string, size int64) (string, error) {
	sr, err := r.OpenFile(name)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	n, err := io.Copy(h, sr)
	if err != nil {
		return "", fmt.Errorf("read: %w", err)
	}
	if n != size {
		return "", fmt.Errorf("read %d bytes, TOC says %d", n, size)
	}
	for off := int64(0); off < size; {
		ce, ok := r.ChunkEntryForOffset(name, off)
		if !ok {
			return "", fmt.Errorf("no chunk for offset %d", off)
		}
		if ce.ChunkOffset != off || ce.ChunkSize <= 0 {
			return "", fmt.Errorf("chunk at %d has chunkOffset=%d chunkSize=%d", off, ce.ChunkOffset, ce.ChunkSize)
		}
		v, err := ver.Verifier(ce)
		if err != nil {
			return "", fmt.Errorf("chunk at %d: %w", off, err)
		}
		if _, err := io.Copy(v, io.NewSectionReader(sr, ce.ChunkOffset, ce.ChunkSize)); err != nil {
			return "", fmt.Errorf("chunk at %d: read: %w", off, err)
		}
		if !v.Verified() {
			return "", fmt.Errorf("chunk at %d (size %d): digest mismatch", off, ce.ChunkSize)
		}
		off += ce.ChunkSize
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func cmdBuild(args []string) error {
	if len(args) < 2 {
		usage()
	}
	in, outPath := args[0], args[1]
	fs := flag.NewFlagSet("build", flag.ContinueOnError)
	level := fs.Int("level", -1, "compression level (default: 9 for gzip, 3 for zstd)")
	format := fs.String("format", "gzip", "gzip (eStargz) or zstd (zstd:chunked)")
	chunkSize := fs.Int("chunk-size", 0, "chunk size in bytes (0: library default)")
	prioFile := fs.String("prioritized", "", "file listing prioritized paths, one per line")
	if err := fs.Parse(args[2:]); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var opts []estargz.Option
	switch *format {
	case "gzip":
		if *level < 0 {
			*level = 9
		}
		opts = append(opts, estargz.WithCompressionLevel(*level))
	case "zstd":
		if *level < 0 {
			*level = 3
		}
		opts = append(opts, estargz.WithCompression(zstdCompression{
			&zstdchunked.Compressor{CompressionLevel: zstd.EncoderLevelFromZstd(*level)},
			&zstdchunked.Decompressor{}}))
	default:
		return fmt.Errorf("unknown format %q", *format)
	}
	if *chunkSize > 0 {
		opts = append(opts, estargz.WithChunkSize(*chunkSize))
	}
	if *prioFile != "" {
		data, err := os.ReadFile(*prioFile)
		if err != nil {
			return err
		}
		var files []string
		for _, l := range strings.Split(string(data), "\n") {
			if l = strings.TrimSpace(l); l != "" {
				files = append(files, l)
			}
		}
		opts = append(opts, estargz.WithPrioritizedFiles(files))
	}

	f, err := os.Open(in)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	blob, err := estargz.Build(io.NewSectionReader(f, 0, st.Size()), opts...)
	if err != nil {
		return err
	}
	defer blob.Close()
	out, err := os.Create(outPath)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, blob); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	// DiffID is only valid once the blob has been read to the end.
	fmt.Println(blob.TOCDigest())
	fmt.Println(blob.DiffID())
	return nil
}

// zstdCompression pairs the reference zstd:chunked compressor and decompressor, which
// estargz.Build wants as one estargz.Compression.
type zstdCompression struct {
	*zstdchunked.Compressor
	*zstdchunked.Decompressor
}
