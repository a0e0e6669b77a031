/* Batches of many pods -> pcapng EPBs in time order: the controller's per-packet loops in C.
 *
 * Why C: turning each packet into a Python tuple, sorting and packing its EPB cost
 * 0.9 us per packet (add_batch 0.33 + pcapng 0.55), seven times what tcpdump -w
 * spends in total (bench/capture_bench.py, issue 16). controller/packets/merge.py
 * says what each function means and holds the pure-Python twin;
 * tests/unit/test_capture_native.py checks both give the same bytes.
 *
 * ifindexes(meta) -> list of the distinct ifindexes, first seen first
 * prepare(data, meta, ifids {ifindex: ifid}, flags[8]) -> records sorted by ts (stable)
 * merge(runs [(data, records, pos)], mark, max_packets, budget, force_first, counts)
 *     -> (epbs, positions, written, first_ts, stop)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define META_SIZE 24
#define EPB_TYPE 6
#define EPB_FIXED 44

typedef struct {
    int64_t ts;
    uint32_t ifid, flags, caplen, origlen;
    uint64_t offset;
} Rec; /* 32 bytes, the RECORD layout of merge.py */

static inline uint32_t rd32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline int64_t rd64(const unsigned char *p) { int64_t v; memcpy(&v, p, 8); return v; }

static PyObject *ifindexes(PyObject *self, PyObject *args) {
    Py_buffer meta;
    if (!PyArg_ParseTuple(args, "y*", &meta)) return NULL;
    PyObject *out = PyList_New(0), *seen = PySet_New(NULL);
    if (!out || !seen) goto fail;
    if (meta.len % META_SIZE) {
        PyErr_SetString(PyExc_ValueError, "batch meta is not a whole number of frame records");
        goto fail;
    }
    const unsigned char *m = meta.buf;
    uint32_t last = 0;
    int have = 0;
    for (Py_ssize_t i = 0; i + META_SIZE <= meta.len; i += META_SIZE) {
        uint32_t index = rd32(m + i + 8);
        if (have && index == last) continue;
        have = 1;
        last = index;
        PyObject *key = PyLong_FromUnsignedLong(index);
        if (!key) goto fail;
        int in = PySet_Contains(seen, key);
        if (in < 0 || (!in && (PySet_Add(seen, key) || PyList_Append(out, key)))) {
            Py_DECREF(key);
            goto fail;
        }
        Py_DECREF(key);
    }
    Py_DECREF(seen);
    PyBuffer_Release(&meta);
    return out;
fail:
    Py_XDECREF(out);
    Py_XDECREF(seen);
    PyBuffer_Release(&meta);
    return NULL;
}

/* Stable merge sort by ts; O(n) when the input is already in order (the usual case). */
static void sort_recs(Rec *a, Rec *tmp, Py_ssize_t n) {
    if (n < 2) return;
    Py_ssize_t mid = n / 2;
    sort_recs(a, tmp, mid);
    sort_recs(a + mid, tmp, n - mid);
    if (a[mid - 1].ts <= a[mid].ts) return;
    memcpy(tmp, a, (size_t)mid * sizeof(Rec));
    Py_ssize_t i = 0, j = mid, k = 0;
    while (i < mid && j < n) a[k++] = (a[j].ts < tmp[i].ts) ? a[j++] : tmp[i++];
    while (i < mid) a[k++] = tmp[i++];
}

static PyObject *prepare(PyObject *self, PyObject *args) {
    Py_buffer data, meta;
    PyObject *ifids, *flags;
    if (!PyArg_ParseTuple(args, "y*y*O!O", &data, &meta, &PyDict_Type, &ifids, &flags)) return NULL;
    PyObject *out = NULL;
    Rec *tmp = NULL;
    uint32_t table[8];
    PyObject *fl = PySequence_Fast(flags, "flags must be a sequence of 8 ints");
    if (!fl) goto done;
    if (PySequence_Fast_GET_SIZE(fl) != 8) {
        PyErr_SetString(PyExc_ValueError, "flags must have 8 entries (sll_pkttype 0-7)");
        Py_DECREF(fl);
        goto done;
    }
    for (int i = 0; i < 8; i++) {
        table[i] = (uint32_t)PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(fl, i));
        if (PyErr_Occurred()) break; /* no further C-API call with an exception set */
    }
    Py_DECREF(fl);
    if (PyErr_Occurred()) goto done;
    if (meta.len % META_SIZE) {
        PyErr_SetString(PyExc_ValueError, "batch meta is not a whole number of frame records");
        goto done;
    }
    Py_ssize_t n = meta.len / META_SIZE;
    out = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(Rec));
    if (!out) goto done;
    Rec *recs = (Rec *)PyBytes_AS_STRING(out);
    const unsigned char *m = meta.buf;
    uint64_t offset = 0;
    uint32_t last_index = 0, last_ifid = 0;
    int have = 0, sorted = 1;
    for (Py_ssize_t i = 0; i < n; i++, m += META_SIZE) {
        uint32_t index = rd32(m + 8), caplen = rd32(m + 12);
        if (!have || index != last_index) {
            PyObject *key = PyLong_FromUnsignedLong(index);
            if (!key) goto fail;
            PyObject *v = PyDict_GetItemWithError(ifids, key);
            Py_DECREF(key);
            if (!v) {
                if (!PyErr_Occurred()) PyErr_Format(PyExc_KeyError, "ifindex %u has no interface id", index);
                goto fail;
            }
            last_ifid = (uint32_t)PyLong_AsUnsignedLong(v);
            if (PyErr_Occurred()) goto fail;
            last_index = index;
            have = 1;
        }
        if (offset + caplen > (uint64_t)data.len) {
            PyErr_SetString(PyExc_ValueError, "batch meta names more bytes than its data holds");
            goto fail;
        }
        recs[i].ts = rd64(m);
        recs[i].ifid = last_ifid;
        recs[i].flags = table[m[20] & 7];
        recs[i].caplen = caplen;
        recs[i].origlen = rd32(m + 16);
        recs[i].offset = offset;
        offset += caplen;
        if (i && recs[i].ts < recs[i - 1].ts) sorted = 0;
    }
    if (!sorted) {
        tmp = PyMem_Malloc((size_t)(n / 2 + 1) * sizeof(Rec));
        if (!tmp) { PyErr_NoMemory(); goto fail; }
        sort_recs(recs, tmp, n);
    }
    goto done;
fail:
    Py_CLEAR(out);
done:
    PyMem_Free(tmp);
    PyBuffer_Release(&data);
    PyBuffer_Release(&meta);
    return out;
}

typedef struct {
    const Rec *recs;
    const unsigned char *data;
    Py_ssize_t n, pos, datalen;
} Run;

typedef struct { int64_t ts; Py_ssize_t run; } Entry;

static inline int before(const Entry *a, const Entry *b) {
    return a->ts < b->ts || (a->ts == b->ts && a->run < b->run);
}

static void sift_down(Entry *h, Py_ssize_t n, Py_ssize_t i) {
    for (;;) {
        Py_ssize_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && before(&h[l], &h[m])) m = l;
        if (r < n && before(&h[r], &h[m])) m = r;
        if (m == i) return;
        Entry t = h[i]; h[i] = h[m]; h[m] = t;
        i = m;
    }
}

static PyObject *merge(PyObject *self, PyObject *args) {
    PyObject *runs_arg, *counts;
    long long mark, max_packets, budget;
    int force_first;
    if (!PyArg_ParseTuple(args, "OLLLpO!", &runs_arg, &mark, &max_packets, &budget, &force_first,
                          &PyList_Type, &counts))
        return NULL;
    PyObject *seq = PySequence_Fast(runs_arg, "runs must be a sequence of (data, records, pos)");
    if (!seq) return NULL;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(seq), nif = PyList_GET_SIZE(counts);
    Py_buffer *views = PyMem_Calloc((size_t)k + 1, 2 * sizeof(Py_buffer));
    Run *runs = PyMem_Calloc((size_t)k + 1, sizeof(Run));
    Entry *heap = PyMem_Calloc((size_t)k + 1, sizeof(Entry));
    uint64_t *per_if = PyMem_Calloc((size_t)nif + 1, sizeof(uint64_t));
    PyObject *out = NULL, *positions = NULL, *result = NULL;
    Py_ssize_t got = 0, hn = 0, bound = 0, used = 0;
    long long written = 0, first_ts = -1;
    int stop = 0;
    if (!views || !runs || !heap || !per_if) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, i);
        Py_ssize_t pos;
        if (!PyArg_ParseTuple(t, "y*y*n", &views[2 * i], &views[2 * i + 1], &pos)) goto done;
        got = i + 1;
        if (views[2 * i + 1].len % (Py_ssize_t)sizeof(Rec)) {
            PyErr_SetString(PyExc_ValueError, "records are not a whole number of 32-byte records");
            goto done;
        }
        Run *r = &runs[i];
        r->data = views[2 * i].buf;
        r->datalen = views[2 * i].len;
        r->recs = views[2 * i + 1].buf;
        r->n = views[2 * i + 1].len / (Py_ssize_t)sizeof(Rec);
        r->pos = pos < 0 ? 0 : pos;
        for (Py_ssize_t j = r->pos; j < r->n && r->recs[j].ts <= mark; j++) {
            const Rec *c = &r->recs[j];
            if (c->offset + c->caplen > (uint64_t)r->datalen || c->ifid >= (uint64_t)nif) {
                PyErr_SetString(PyExc_ValueError, "a record points outside its data or interfaces");
                goto done;
            }
            bound += EPB_FIXED + c->caplen + 3;
        }
        if (r->pos < r->n && r->recs[r->pos].ts <= mark) {
            heap[hn].ts = r->recs[r->pos].ts;
            heap[hn].run = i;
            hn++;
        }
    }
    for (Py_ssize_t i = hn / 2; i-- > 0;) sift_down(heap, hn, i);
    out = PyBytes_FromStringAndSize(NULL, bound);
    if (!out) goto done;
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    while (hn) {
        Run *r = &runs[heap[0].run];
        const Rec *c = &r->recs[r->pos];
        uint32_t pad = (-c->caplen) & 3, length = EPB_FIXED + c->caplen + pad;
        if (max_packets >= 0 && written >= max_packets) { stop = 1; break; }
        if (budget >= 0 && (long long)length > budget && !(force_first && written == 0)) { stop = 2; break; }
        uint32_t head[7] = {EPB_TYPE, length, c->ifid, (uint32_t)((uint64_t)c->ts >> 32),
                            (uint32_t)((uint64_t)c->ts & 0xffffffffu), c->caplen, c->origlen};
        memcpy(o + used, head, sizeof head);
        used += sizeof head;
        memcpy(o + used, r->data + c->offset, c->caplen);
        used += c->caplen;
        memset(o + used, 0, pad);
        used += pad;
        uint16_t opt[2] = {2, 4};
        memcpy(o + used, opt, 4);
        memcpy(o + used + 4, &c->flags, 4);
        memset(o + used + 8, 0, 4);
        memcpy(o + used + 12, &length, 4);
        used += 16;
        if (budget >= 0) budget -= length;
        if (written == 0) first_ts = c->ts;
        written++;
        per_if[c->ifid]++;
        r->pos++;
        if (r->pos < r->n && r->recs[r->pos].ts <= mark) {
            heap[0].ts = r->recs[r->pos].ts;
        } else {
            heap[0] = heap[--hn];
        }
        sift_down(heap, hn, 0);
    }
    if (_PyBytes_Resize(&out, used)) goto done;
    for (Py_ssize_t i = 0; i < nif; i++) {
        if (!per_if[i]) continue;
        PyObject *old = PyList_GET_ITEM(counts, i);
        PyObject *add = PyLong_FromUnsignedLongLong(per_if[i]);
        PyObject *sum = add ? PyNumber_Add(old, add) : NULL;
        Py_XDECREF(add);
        if (!sum) goto done;
        PyList_SetItem(counts, i, sum);
    }
    positions = PyList_New(k);
    if (!positions) goto done;
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *p = PyLong_FromSsize_t(runs[i].pos);
        if (!p) goto done;
        PyList_SET_ITEM(positions, i, p);
    }
    result = Py_BuildValue("(OOLLi)", out, positions, written, first_ts, stop);
done:
    Py_XDECREF(out);
    Py_XDECREF(positions);
    for (Py_ssize_t i = 0; i < got; i++) {
        PyBuffer_Release(&views[2 * i]);
        PyBuffer_Release(&views[2 * i + 1]);
    }
    PyMem_Free(views);
    PyMem_Free(runs);
    PyMem_Free(heap);
    PyMem_Free(per_if);
    Py_DECREF(seq);
    return result;
}

static PyMethodDef methods[] = {
    {"ifindexes", ifindexes, METH_VARARGS, "The distinct ifindexes of a batch's meta, first seen first."},
    {"prepare", prepare, METH_VARARGS, "A batch's meta -> 32-byte records with interface ids, sorted by time."},
    {"merge", merge, METH_VARARGS, "Runs of records -> EPBs in time order up to a watermark and limits."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_epb", "Batches to pcapng EPBs (see merge.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__epb(void) { return PyModule_Create(&module); }
