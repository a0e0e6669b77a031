// paced UDP sender over many flows: udpsend DST PORT PPS COUNT NFLOWS SRC_PREFIX
// flow i: a socket bound to SRC_PREFIX.(1 + i % 64), an ephemeral port, connected to DST:PORT;
// one 22-byte datagram (a 64-byte Ethernet frame) per send, round-robin over the flows,
// in bursts of BURST paced by sleeping, so the sender leaves the CPU to the lab.
// Prints what it sent as JSON (same fields as pktsend.c).
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#define BURST 32
static inline uint64_t now_ns(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return (uint64_t)t.tv_sec*1000000000ull+t.tv_nsec;}
int main(int argc,char**argv){
  if(argc<7){fprintf(stderr,"usage: %s DST PORT PPS COUNT NFLOWS SRC_PREFIX\n",argv[0]);return 2;}
  double pps=atof(argv[3]); long count=atol(argv[4]); int nflows=atoi(argv[5]);
  if(nflows<1||nflows>4096){fprintf(stderr,"NFLOWS: 1-4096\n");return 2;}
  int*fds=calloc(nflows,sizeof(int));
  struct sockaddr_in dst={0}; dst.sin_family=AF_INET; dst.sin_port=htons(atoi(argv[2]));
  if(inet_pton(AF_INET,argv[1],&dst.sin_addr)!=1){fprintf(stderr,"bad DST\n");return 2;}
  for(int i=0;i<nflows;i++){
    char src[64]; snprintf(src,sizeof src,"%s.%d",argv[6],1+i%64);
    struct sockaddr_in s={0}; s.sin_family=AF_INET; inet_pton(AF_INET,src,&s.sin_addr);
    fds[i]=socket(AF_INET,SOCK_DGRAM,0);
    if(fds[i]<0||bind(fds[i],(struct sockaddr*)&s,sizeof s)||connect(fds[i],(struct sockaddr*)&dst,sizeof dst)){perror(src);return 1;}
  }
  char payload[22]; memset(payload,'A',sizeof payload);
  uint64_t period = pps>0 ? (uint64_t)(1e9/pps) : 0, t0=now_ns(), base=t0; long sent=0, resets=0, fails=0, j=0;
  for(long i=0;i<count;i++,j++){
    if(period && i%BURST==0){  // paced per burst, sleeping (not spinning) while ahead:
      uint64_t due=base+j*period, n;  // the lab's forwarding needs the CPU more than we do
      while((n=now_ns())<due){ struct timespec ts={0,(long)(due-n)}; nanosleep(&ts,NULL); }
      if(n-due>2000000){ base=n; j=0; resets++; }   // >2 ms behind: do not burst to catch up
    }
    if(send(fds[i%nflows],payload,sizeof payload,0)==(ssize_t)sizeof payload) sent++; else fails++;
  }
  double dt=(now_ns()-t0)/1e9;
  printf("{\"sent\": %ld, \"fails\": %ld, \"secs\": %.3f, \"pps\": %.0f, \"schedule_resets\": %ld}\n",sent,fails,dt,sent/dt,resets);
  return 0;
}
