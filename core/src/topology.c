/* topology.c: what the machine is, as JSON text for the Lua policy (moonshard.topology).
 *
 *   hwloc   packages, NUMA nodes (memory, huge pages), cores, PUs, and the PCI tree: every NVIDIA
 *           GPU's bus id, its NUMA node and the PCI bridge it sits under (a PCIe switch or a
 *           root port), from this machine or from an hwloc XML file standing in for it
 *   NVML    loaded at run time (dlopen "libnvidia-ml.so.1"): per GPU its name, memory, power
 *           cap, clocks, PCIe generation and width, NVLink links and the peers they reach, and
 *           the pairwise common ancestor and P2P status; absent means "no GPUs", not a failure
 *   limits  RLIMIT_MEMLOCK
 *
 * The text is built once at msh_topology_load; the Lua side decodes it into a plain table. Nothing
 * here decides anything: islands and plans are Lua's (moonshard.topology, moonshard.plan).
 */
#define _GNU_SOURCE
#include "internal.h"

#include <cjson/cJSON.h>
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <sys/resource.h>
#include <unistd.h>

#ifdef MSH_WITH_HWLOC
#include <hwloc.h>
#endif

struct msh_topology {
  char *json; /* the description, NUL-terminated */
};

/* ------------------------------------------------------------------------------ helpers */

static void add_num(cJSON *o, const char *k, double v) { cJSON_AddNumberToObject(o, k, v); }
static void add_str(cJSON *o, const char *k, const char *v) {
  if (v) cJSON_AddStringToObject(o, k, v);
}

/* "0000:3b:00.0" (lower case, 4-digit domain): the form both hwloc and NVML are mapped to */
static void busid_str(char *buf, size_t n, unsigned dom, unsigned bus, unsigned dev, unsigned fn) {
  snprintf(buf, n, "%04x:%02x:%02x.%x", dom, bus, dev, fn);
}

/* ------------------------------------------------------------------------------ hwloc */

#ifdef MSH_WITH_HWLOC
static cJSON *cpuset_list(hwloc_const_bitmap_t set) {
  char *s = NULL;
  if (hwloc_bitmap_list_asprintf(&s, set) < 0) return cJSON_CreateString("");
  cJSON *j = cJSON_CreateString(s);
  free(s);
  return j;
}

/* The NUMA node (os index) nearest an I/O object: the first of its non-I/O ancestor's nodes. */
static int io_numa(hwloc_topology_t topo, hwloc_obj_t obj) {
  hwloc_obj_t anc = hwloc_get_non_io_ancestor_obj(topo, obj);
  if (!anc || !anc->nodeset || hwloc_bitmap_iszero(anc->nodeset)) return -1;
  /* an ancestor spanning every node (the machine) says nothing */
  if (anc->type == HWLOC_OBJ_MACHINE && hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE) > 1) return -1;
  return hwloc_bitmap_first(anc->nodeset);
}

static msh_status hwloc_part(cJSON *root, const char *xml_path) {
  hwloc_topology_t topo;
  if (hwloc_topology_init(&topo) != 0) return MSH_FAIL(MSH_ENOMEM, "hwloc_topology_init failed");
  if (xml_path && xml_path[0] && hwloc_topology_set_xml(topo, xml_path) != 0) {
    hwloc_topology_destroy(topo);
    return MSH_FAIL(MSH_EIO, "cannot read the hwloc XML file '%s'", xml_path);
  }
  hwloc_topology_set_io_types_filter(topo, HWLOC_TYPE_FILTER_KEEP_IMPORTANT);
  if (hwloc_topology_load(topo) != 0) {
    hwloc_topology_destroy(topo);
    if (xml_path && xml_path[0]) return MSH_FAIL(MSH_EFORMAT, "'%s' is not an hwloc XML topology", xml_path);
    return MSH_FAIL(MSH_EIO, "hwloc could not discover this machine's topology");
  }
  hwloc_obj_t top = hwloc_get_root_obj(topo);
  cJSON *m = cJSON_AddObjectToObject(root, "machine");
  add_str(m, "hostname", hwloc_obj_get_info_by_name(top, "HostName"));
  add_str(m, "arch", hwloc_obj_get_info_by_name(top, "Architecture"));
  add_num(m, "memory", (double)top->total_memory);
  add_num(m, "packages", hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_PACKAGE));
  add_num(m, "cores", hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_CORE));
  add_num(m, "pus", hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_PU));
  hwloc_obj_t pkg = hwloc_get_obj_by_type(topo, HWLOC_OBJ_PACKAGE, 0);
  if (pkg) add_str(m, "cpu_model", hwloc_obj_get_info_by_name(pkg, "CPUModel"));
  add_str(m, "source", xml_path && xml_path[0] ? xml_path : "this machine");

  cJSON *numa = cJSON_AddArrayToObject(root, "numa");
  int nn = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE);
  for (int i = 0; i < nn; i++) {
    hwloc_obj_t o = hwloc_get_obj_by_type(topo, HWLOC_OBJ_NUMANODE, (unsigned)i);
    cJSON *n = cJSON_CreateObject();
    add_num(n, "os_index", o->os_index);
    add_num(n, "memory", (double)o->attr->numanode.local_memory);
    cJSON_AddItemToObject(n, "cpus", cpuset_list(o->cpuset));
    add_num(n, "cores", hwloc_get_nbobjs_inside_cpuset_by_type(topo, o->cpuset, HWLOC_OBJ_CORE));
    hwloc_obj_t p = hwloc_get_ancestor_obj_by_type(topo, HWLOC_OBJ_PACKAGE, o);
    if (!p && o->cpuset) p = hwloc_get_next_obj_covering_cpuset_by_type(topo, o->cpuset, HWLOC_OBJ_PACKAGE, NULL);
    add_num(n, "package", p ? (double)p->logical_index : 0);
    cJSON *pages = cJSON_AddArrayToObject(n, "page_types");
    for (unsigned k = 0; k < o->attr->numanode.page_types_len; k++) {
      cJSON *pt = cJSON_CreateObject();
      add_num(pt, "size", (double)o->attr->numanode.page_types[k].size);
      add_num(pt, "count", (double)o->attr->numanode.page_types[k].count);
      cJSON_AddItemToArray(pages, pt);
    }
    cJSON_AddItemToArray(numa, n);
  }

  /* NVIDIA display / 3D controllers: class 0x03xx, vendor 0x10de */
  cJSON *pci = cJSON_AddArrayToObject(root, "pci_gpus");
  for (hwloc_obj_t o = hwloc_get_next_pcidev(topo, NULL); o; o = hwloc_get_next_pcidev(topo, o)) {
    struct hwloc_pcidev_attr_s *a = &o->attr->pcidev;
    if (a->vendor_id != 0x10de || (a->class_id >> 8) != 0x03) continue;
    char id[32];
    busid_str(id, sizeof id, a->domain, a->bus, a->dev, a->func);
    cJSON *g = cJSON_CreateObject();
    add_str(g, "busid", id);
    add_num(g, "numa", io_numa(topo, o));
    add_num(g, "device_id", a->device_id);
    add_num(g, "link_gbs", a->linkspeed);
    /* the bridges above it, nearest first: the topmost PCI-to-PCI one is the switch (or root
     * port) it shares with its neighbours; the host bridge names the root complex */
    cJSON *br = cJSON_AddArrayToObject(g, "bridges");
    for (hwloc_obj_t p = o->parent; p && p->type == HWLOC_OBJ_BRIDGE; p = p->parent) {
      char bid[48];
      if (p->attr->bridge.upstream_type == HWLOC_OBJ_BRIDGE_PCI) {
        struct hwloc_pcidev_attr_s *u = &p->attr->bridge.upstream.pci;
        busid_str(bid, sizeof bid, u->domain, u->bus, u->dev, u->func);
      } else {
        snprintf(bid, sizeof bid, "host:%04x:%02x", p->attr->bridge.downstream.pci.domain,
                 p->attr->bridge.downstream.pci.secondary_bus);
      }
      cJSON_AddItemToArray(br, cJSON_CreateString(bid));
    }
    cJSON_AddItemToArray(pci, g);
  }
  hwloc_topology_destroy(topo);
  return MSH_OK;
}
#else
static msh_status hwloc_part(cJSON *root, const char *xml_path) {
  if (xml_path && xml_path[0])
    return MSH_FAIL(MSH_EUNSUPPORTED, "cannot read '%s': this build has no hwloc (Debian: libhwloc-dev)", xml_path);
  cJSON *m = cJSON_AddObjectToObject(root, "machine");
  add_str(m, "source", "sysconf (built without hwloc)");
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGE_SIZE);
  add_num(m, "memory", (double)pages * (double)psz);
  add_num(m, "packages", 1);
  add_num(m, "cores", (double)n);
  add_num(m, "pus", (double)n);
  cJSON_AddArrayToObject(root, "numa");
  cJSON_AddArrayToObject(root, "pci_gpus");
  return MSH_OK;
}
#endif

/* ------------------------------------------------------------------------------- NVML */

/* The few NVML types used, as nvml.h lays them out (NVML's ABI is stable across drivers). */
typedef void *nvml_dev;
typedef struct {
  char bus_id_legacy[16];
  unsigned domain, bus, device, pci_device_id, pci_subsystem_id;
  char bus_id[32];
} nvml_pci;
typedef struct {
  unsigned long long total, free, used;
} nvml_mem;

enum { NVML_CLOCK_SM = 1, NVML_CLOCK_MEM = 2, NVML_MAX_LINKS = 18, NVML_LINK_SWITCH = 2 };

typedef int (*fn_void)(void);
typedef int (*fn_uint)(unsigned *);
typedef int (*fn_int)(int *);
typedef int (*fn_str)(char *, unsigned);
typedef int (*fn_handle)(unsigned, nvml_dev *);
typedef int (*fn_dev_str)(nvml_dev, char *, unsigned);
typedef int (*fn_dev_pci)(nvml_dev, nvml_pci *);
typedef int (*fn_dev_mem)(nvml_dev, nvml_mem *);
typedef int (*fn_dev_uint)(nvml_dev, unsigned *);
typedef int (*fn_dev_clock)(nvml_dev, int, unsigned *);
typedef int (*fn_dev_int2)(nvml_dev, int *, int *);
typedef int (*fn_link_state)(nvml_dev, unsigned, int *);
typedef int (*fn_link_pci)(nvml_dev, unsigned, nvml_pci *);
typedef int (*fn_link_type)(nvml_dev, unsigned, int *);
typedef int (*fn_pair_level)(nvml_dev, nvml_dev, int *);
typedef int (*fn_p2p)(nvml_dev, nvml_dev, int, int *);

/* dlsym's object pointer to a function pointer, through an integer (ISO C has no direct cast) */
static void *sym(void *lib, const char *name) { return dlsym(lib, name); }
#define NVML_FN(type, name) type name = (type)(uintptr_t)sym(lib, #name)

/* "00000000:3B:00.0" -> "0000:3b:00.0" */
static void nvml_busid(const nvml_pci *p, char *buf, size_t n) {
  unsigned dom = 0, bus = 0, dev = 0, fn = 0;
  if (sscanf(p->bus_id, "%x:%x:%x.%x", &dom, &bus, &dev, &fn) == 4) busid_str(buf, n, dom, bus, dev, fn);
  else busid_str(buf, n, p->domain, p->bus, p->device, 0);
}

static void nvml_part(cJSON *root) {
  cJSON *info = cJSON_AddObjectToObject(root, "nvml");
  const char *path = getenv("MSH_NVML_LIBRARY");
  if (!path || !path[0]) path = "libnvidia-ml.so.1";
  void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    const char *e = dlerror();
    add_str(info, "status", "absent");
    add_str(info, "error", e ? e : path);
    return;
  }
  NVML_FN(fn_void, nvmlInit_v2);
  NVML_FN(fn_void, nvmlShutdown);
  NVML_FN(fn_uint, nvmlDeviceGetCount_v2);
  NVML_FN(fn_handle, nvmlDeviceGetHandleByIndex_v2);
  if (!nvmlInit_v2 || !nvmlDeviceGetCount_v2 || !nvmlDeviceGetHandleByIndex_v2 || nvmlInit_v2() != 0) {
    add_str(info, "status", "failed");
    add_str(info, "error", "nvmlInit_v2 failed (driver not loaded?)");
    dlclose(lib);
    return;
  }
  NVML_FN(fn_str, nvmlSystemGetDriverVersion);
  NVML_FN(fn_int, nvmlSystemGetCudaDriverVersion_v2);
  NVML_FN(fn_dev_str, nvmlDeviceGetName);
  NVML_FN(fn_dev_str, nvmlDeviceGetUUID);
  NVML_FN(fn_dev_pci, nvmlDeviceGetPciInfo_v3);
  NVML_FN(fn_dev_mem, nvmlDeviceGetMemoryInfo);
  NVML_FN(fn_dev_uint, nvmlDeviceGetEnforcedPowerLimit);
  NVML_FN(fn_dev_uint, nvmlDeviceGetPowerManagementDefaultLimit);
  NVML_FN(fn_dev_clock, nvmlDeviceGetClockInfo);
  NVML_FN(fn_dev_clock, nvmlDeviceGetMaxClockInfo);
  NVML_FN(fn_dev_uint, nvmlDeviceGetCurrPcieLinkGeneration);
  NVML_FN(fn_dev_uint, nvmlDeviceGetCurrPcieLinkWidth);
  NVML_FN(fn_dev_uint, nvmlDeviceGetMaxPcieLinkGeneration);
  NVML_FN(fn_dev_uint, nvmlDeviceGetMaxPcieLinkWidth);
  NVML_FN(fn_dev_int2, nvmlDeviceGetCudaComputeCapability);
  NVML_FN(fn_link_state, nvmlDeviceGetNvLinkState);
  NVML_FN(fn_link_pci, nvmlDeviceGetNvLinkRemotePciInfo_v2);
  NVML_FN(fn_link_type, nvmlDeviceGetNvLinkRemoteDeviceType);
  NVML_FN(fn_pair_level, nvmlDeviceGetTopologyCommonAncestor);
  NVML_FN(fn_p2p, nvmlDeviceGetP2PStatus);

  add_str(info, "status", "ok");
  char s[96];
  if (nvmlSystemGetDriverVersion && nvmlSystemGetDriverVersion(s, sizeof s) == 0) add_str(info, "driver", s);
  int cv = 0;
  if (nvmlSystemGetCudaDriverVersion_v2 && nvmlSystemGetCudaDriverVersion_v2(&cv) == 0) add_num(info, "cuda_driver", cv);

  unsigned count = 0;
  nvmlDeviceGetCount_v2(&count);
  if (count > 64) count = 64;
  nvml_dev devs[64];
  unsigned have = 0;
  cJSON *gpus = cJSON_AddArrayToObject(root, "nvml_gpus");
  for (unsigned i = 0; i < count; i++) {
    if (nvmlDeviceGetHandleByIndex_v2(i, &devs[have]) != 0) continue;
    nvml_dev d = devs[have++];
    cJSON *g = cJSON_CreateObject();
    add_num(g, "nvml_index", i);
    unsigned u = 0;
    int a = 0, b = 0;
    nvml_pci pci;
    nvml_mem mem;
    if (nvmlDeviceGetName && nvmlDeviceGetName(d, s, sizeof s) == 0) add_str(g, "name", s);
    if (nvmlDeviceGetUUID && nvmlDeviceGetUUID(d, s, sizeof s) == 0) add_str(g, "uuid", s);
    if (nvmlDeviceGetPciInfo_v3 && nvmlDeviceGetPciInfo_v3(d, &pci) == 0) {
      nvml_busid(&pci, s, sizeof s);
      add_str(g, "busid", s);
    }
    if (nvmlDeviceGetMemoryInfo && nvmlDeviceGetMemoryInfo(d, &mem) == 0) {
      add_num(g, "memory", (double)mem.total);
      add_num(g, "memory_free", (double)mem.free);
    }
    if (nvmlDeviceGetEnforcedPowerLimit && nvmlDeviceGetEnforcedPowerLimit(d, &u) == 0) add_num(g, "power_limit_w", u / 1000.0);
    if (nvmlDeviceGetPowerManagementDefaultLimit && nvmlDeviceGetPowerManagementDefaultLimit(d, &u) == 0)
      add_num(g, "power_default_w", u / 1000.0);
    if (nvmlDeviceGetClockInfo && nvmlDeviceGetClockInfo(d, NVML_CLOCK_SM, &u) == 0) add_num(g, "sm_clock_mhz", u);
    if (nvmlDeviceGetMaxClockInfo && nvmlDeviceGetMaxClockInfo(d, NVML_CLOCK_SM, &u) == 0) add_num(g, "sm_clock_max_mhz", u);
    if (nvmlDeviceGetClockInfo && nvmlDeviceGetClockInfo(d, NVML_CLOCK_MEM, &u) == 0) add_num(g, "mem_clock_mhz", u);
    if (nvmlDeviceGetMaxClockInfo && nvmlDeviceGetMaxClockInfo(d, NVML_CLOCK_MEM, &u) == 0) add_num(g, "mem_clock_max_mhz", u);
    if (nvmlDeviceGetCurrPcieLinkGeneration && nvmlDeviceGetCurrPcieLinkGeneration(d, &u) == 0) add_num(g, "pcie_gen", u);
    if (nvmlDeviceGetCurrPcieLinkWidth && nvmlDeviceGetCurrPcieLinkWidth(d, &u) == 0) add_num(g, "pcie_width", u);
    if (nvmlDeviceGetMaxPcieLinkGeneration && nvmlDeviceGetMaxPcieLinkGeneration(d, &u) == 0) add_num(g, "pcie_gen_max", u);
    if (nvmlDeviceGetMaxPcieLinkWidth && nvmlDeviceGetMaxPcieLinkWidth(d, &u) == 0) add_num(g, "pcie_width_max", u);
    if (nvmlDeviceGetCudaComputeCapability && nvmlDeviceGetCudaComputeCapability(d, &a, &b) == 0)
      add_num(g, "compute_capability", a * 10 + b);
    /* NVLink: the links up, and the bus id each reaches ("nvswitch" for a switch) */
    cJSON *links = cJSON_AddArrayToObject(g, "nvlink_peers");
    for (unsigned l = 0; nvmlDeviceGetNvLinkState && l < NVML_MAX_LINKS; l++) {
      int active = 0;
      if (nvmlDeviceGetNvLinkState(d, l, &active) != 0) break;
      if (!active) continue;
      int type = 0;
      if (nvmlDeviceGetNvLinkRemoteDeviceType && nvmlDeviceGetNvLinkRemoteDeviceType(d, l, &type) == 0 &&
          type == NVML_LINK_SWITCH) {
        cJSON_AddItemToArray(links, cJSON_CreateString("nvswitch"));
      } else if (nvmlDeviceGetNvLinkRemotePciInfo_v2 && nvmlDeviceGetNvLinkRemotePciInfo_v2(d, l, &pci) == 0) {
        nvml_busid(&pci, s, sizeof s);
        cJSON_AddItemToArray(links, cJSON_CreateString(s));
      }
    }
    cJSON_AddItemToArray(gpus, g);
  }
  /* pairwise: common ancestor level (0 same board ... 50 across sockets) and P2P read status
   * (0 ok), in NVML's index order */
  cJSON *lvl = cJSON_AddArrayToObject(info, "common_ancestor");
  cJSON *p2p = cJSON_AddArrayToObject(info, "p2p_read");
  for (unsigned i = 0; i < have; i++) {
    cJSON *rl = cJSON_CreateArray(), *rp = cJSON_CreateArray();
    for (unsigned j = 0; j < have; j++) {
      int level = -1, st = -1;
      if (i != j && nvmlDeviceGetTopologyCommonAncestor) nvmlDeviceGetTopologyCommonAncestor(devs[i], devs[j], &level);
      if (i != j && nvmlDeviceGetP2PStatus) nvmlDeviceGetP2PStatus(devs[i], devs[j], 0, &st);
      cJSON_AddItemToArray(rl, cJSON_CreateNumber(i == j ? 0 : level));
      cJSON_AddItemToArray(rp, cJSON_CreateNumber(i == j ? 0 : st));
    }
    cJSON_AddItemToArray(lvl, rl);
    cJSON_AddItemToArray(p2p, rp);
  }
  if (nvmlShutdown) nvmlShutdown();
  dlclose(lib);
}

/* ----------------------------------------------------------------------------- public */

static void limits_part(cJSON *root) {
  struct rlimit rl;
  cJSON *m = cJSON_AddObjectToObject(root, "memlock");
  if (getrlimit(RLIMIT_MEMLOCK, &rl) == 0) {
    /* -1: unlimited (JSON has no infinity) */
    add_num(m, "soft", rl.rlim_cur == RLIM_INFINITY ? -1 : (double)rl.rlim_cur);
    add_num(m, "hard", rl.rlim_max == RLIM_INFINITY ? -1 : (double)rl.rlim_max);
  }
}

msh_status msh_topology_load(msh_topology **out, const char *xml_path, int flags) {
  if (!out) return MSH_FAIL(MSH_EINVAL, "out is NULL");
  *out = NULL;
  cJSON *root = cJSON_CreateObject();
  if (!root) return MSH_FAIL(MSH_ENOMEM, "out of memory");
#ifdef MSH_WITH_HWLOC
  add_str(root, "hwloc", HWLOC_API_VERSION >= 0x20000 ? "2" : "1");
#endif
  msh_status s = hwloc_part(root, xml_path);
  if (s != MSH_OK) {
    cJSON_Delete(root);
    return s;
  }
  if (!(flags & MSH_TOPOLOGY_NO_NVML)) nvml_part(root);
  limits_part(root);
  char *text = cJSON_PrintUnformatted(root);
  cJSON_Delete(root);
  msh_topology *t = text ? calloc(1, sizeof *t) : NULL;
  if (!t) {
    free(text);
    return MSH_FAIL(MSH_ENOMEM, "out of memory");
  }
  t->json = text;
  *out = t;
  return MSH_OK;
}

void msh_topology_free(msh_topology *t) {
  if (!t) return;
  free(t->json);
  free(t);
}

const char *msh_topology_json(const msh_topology *t, size_t *len) {
  if (!t) return NULL;
  if (len) *len = strlen(t->json);
  return t->json;
}

/* --------------------------------------------------------------------------- NUMA binding */

#ifdef MSH_WITH_HWLOC
static msh_status numa_topology(hwloc_topology_t *topo) {
  if (hwloc_topology_init(topo) != 0) return MSH_FAIL(MSH_ENOMEM, "hwloc_topology_init failed");
  if (hwloc_topology_load(*topo) != 0) {
    hwloc_topology_destroy(*topo);
    return MSH_FAIL(MSH_EIO, "hwloc could not read this machine's topology");
  }
  return MSH_OK;
}

msh_status msh_numa_bind(int os_index) {
  hwloc_topology_t topo;
  msh_status st = numa_topology(&topo);
  if (st != MSH_OK) return st;
  hwloc_obj_t node = NULL;
  for (hwloc_obj_t o = hwloc_get_next_obj_by_type(topo, HWLOC_OBJ_NUMANODE, NULL); o;
       o = hwloc_get_next_obj_by_type(topo, HWLOC_OBJ_NUMANODE, o))
    if ((int)o->os_index == os_index) node = o;
  if (!node) {
    int n = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE);
    hwloc_topology_destroy(topo);
    return MSH_FAIL(MSH_EINVAL, "NUMA node %d: this machine has %d NUMA node%s", os_index, n, n == 1 ? "" : "s");
  }
  if (hwloc_set_cpubind(topo, node->cpuset, HWLOC_CPUBIND_PROCESS) != 0) {
    hwloc_topology_destroy(topo);
    return MSH_FAIL(MSH_EIO, "binding the process's threads to NUMA node %d's CPUs failed", os_index);
  }
  /* Linux keeps a memory policy per thread: the process-wide form is refused there, and the
   * calling thread's policy (the one that loads weights and allocates pinned buffers) is what
   * counts; threads started later inherit it. */
  if (hwloc_set_membind(topo, node->nodeset, HWLOC_MEMBIND_BIND, HWLOC_MEMBIND_PROCESS | HWLOC_MEMBIND_BYNODESET) != 0 &&
      hwloc_set_membind(topo, node->nodeset, HWLOC_MEMBIND_BIND, HWLOC_MEMBIND_THREAD | HWLOC_MEMBIND_BYNODESET) != 0) {
    int e = errno;
    hwloc_topology_destroy(topo);
    return MSH_FAIL(MSH_EIO, "binding the process's memory to NUMA node %d failed: %s", os_index, strerror(e));
  }
  hwloc_topology_destroy(topo);
  return MSH_OK;
}

static void list_string(hwloc_const_bitmap_t set, char *buf, size_t cap) {
  if (cap == 0) return;
  buf[0] = 0;
  if (set) hwloc_bitmap_list_snprintf(buf, cap, set);
}

msh_status msh_numa_binding(char *cpus, size_t cpus_cap, char *nodes, size_t nodes_cap) {
  hwloc_topology_t topo;
  msh_status st = numa_topology(&topo);
  if (st != MSH_OK) return st;
  hwloc_bitmap_t cs = hwloc_bitmap_alloc(), ns = hwloc_bitmap_alloc();
  hwloc_membind_policy_t pol;
  if (!cs || !ns) {
    hwloc_bitmap_free(cs);
    hwloc_bitmap_free(ns);
    hwloc_topology_destroy(topo);
    return MSH_FAIL(MSH_ENOMEM, "out of memory");
  }
  if (hwloc_get_cpubind(topo, cs, HWLOC_CPUBIND_PROCESS) != 0) hwloc_bitmap_copy(cs, hwloc_topology_get_allowed_cpuset(topo));
  if (hwloc_get_membind(topo, ns, &pol, HWLOC_MEMBIND_PROCESS | HWLOC_MEMBIND_BYNODESET) != 0 &&
      hwloc_get_membind(topo, ns, &pol, HWLOC_MEMBIND_THREAD | HWLOC_MEMBIND_BYNODESET) != 0)
    hwloc_bitmap_copy(ns, hwloc_topology_get_allowed_nodeset(topo));
  list_string(cs, cpus, cpus_cap);
  list_string(ns, nodes, nodes_cap);
  hwloc_bitmap_free(cs);
  hwloc_bitmap_free(ns);
  hwloc_topology_destroy(topo);
  return MSH_OK;
}
#else
msh_status msh_numa_bind(int os_index) {
  return MSH_FAIL(MSH_EUNSUPPORTED, "cannot bind to NUMA node %d: this build has no hwloc (Debian: libhwloc-dev)", os_index);
}
msh_status msh_numa_binding(char *cpus, size_t cpus_cap, char *nodes, size_t nodes_cap) {
  (void)cpus, (void)cpus_cap, (void)nodes, (void)nodes_cap;
  return MSH_FAIL(MSH_EUNSUPPORTED, "this build has no hwloc (Debian: libhwloc-dev)");
}
#endif
